//! `tunnelfleet profiles | assign | rollout | agents` end to end: the real binary against a
//! coordinator (real QUIC, sled, admin API) with an agent connected; JSON and exit codes.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tunnelfleet_coordinator::pki;
use tunnelfleet_coordinator::server::{self, CoordinatorConfig};
use tunnelfleet_protocol::{Applied, CoordinatorMessage, Hello, PROTOCOL_VERSION};

async fn tf(admin: &str, token: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnelfleet"))
        .args(args)
        .args(["--coordinator", admin, "--token-file"])
        .arg(token)
        .output()
        .await
        .unwrap()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_assign_rollout_and_agents_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &["localhost".into()]).unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        admin_tls: false,
        admin_plaintext_on_network: false,
        pki_dir: pki_dir.clone(),
        state_dir: dir.path().join("state"),
        store: Default::default(),
        etcd: None,
        name: None,
        admin_token_file: token.clone(),
        heartbeat_interval: Duration::from_millis(500),
        ssh_cert_validity: tunnelfleet_coordinator::sshca::DEFAULT_VALIDITY,
        alerts: Default::default(),
        hooks: Vec::new(),
        metrics_listen: None,
        web_listen: None,
        udp_buffer: tunnelfleet_coordinator::udp::DEFAULT_BUFFER,
    };
    let bound = server::bind(&cfg).await.unwrap();
    let (control, admin) = (bound.control, bound.admin.to_string());
    let stop = CancellationToken::new();
    let coordinator = tokio::spawn(bound.run(stop.clone()));

    // A protocol-level agent that acknowledges every push.
    let files = pki::issue_agent(&pki_dir, "vma-1", 30, &dir.path().join("agent")).unwrap();
    let client =
        tunnelfleet_agent::link::client_config(&files.ca, &files.cert, &files.key).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: "vma-1".into(),
        agent_version: "test".into(),
        labels: [("site".to_string(), "dc1".to_string())].into(),
        applied_version: None,
        started_unix_ms: 1,
    };
    let mut link = tunnelfleet_agent::link::connect(&endpoint, client, control, "localhost", hello)
        .await
        .unwrap();
    // What the CLI asked the agent for, in order: the CLI's own work, checked below (the
    // answers are the stub's).
    let asked: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let log = asked.clone();
    let agent = tokio::spawn(async move {
        while let Ok(m) = link.next().await {
            if let CoordinatorMessage::Command(c) = &m {
                log.lock()
                    .unwrap()
                    .push((format!("{:?}", c.action), c.profile.clone()));
            }
            match m {
                CoordinatorMessage::Push(set) => link
                    .applied(Applied {
                        version: set.version,
                        ok: true,
                        results: vec![],
                    })
                    .await
                    .unwrap(),
                // Answers commands as the agent would: a known profile works, others do not.
                CoordinatorMessage::Command(c) => link
                    .command_result(tunnelfleet_protocol::CommandResult {
                        id: c.id,
                        ok: c.profile == "oma" || c.profile.is_empty(),
                        message: format!("{:?} {}", c.action, c.profile),
                        report: Some(format!("{{\"action\":\"{:?}\"}}", c.action)),
                    })
                    .await
                    .unwrap(),
                _ => {}
            }
        }
    });

    let profile = dir.path().join("oma.toml");
    std::fs::write(
        &profile,
        "[[profile]]\nname = \"oma\"\nendpoints = [\"oma-a:443\", \"oma-b:443\"]\nuser = \"vma\"\nidentity_file = \"/etc/tunnelfleet/id\"\n\
         known_hosts = \"/etc/tunnelfleet/known_hosts\"\nforwards = [\"L 8082:localhost:8082\", \"R 9081:localhost:8081\"]\n",
    )
    .unwrap();
    let o = tf(
        &admin,
        &token,
        &[
            "profiles",
            "apply",
            "-f",
            profile.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["version"], 1);
    let o = tf(&admin, &token, &["profiles", "list", "--json"]).await;
    assert_eq!(json(&o)[0]["forwards"][1], "R 9081:localhost:8081");
    let o = tf(
        &admin,
        &token,
        &["assign", "oma", "--label", "site=dc1", "--json"],
    )
    .await;
    assert_eq!(json(&o)["version"], 2);
    assert_eq!(json(&o)["pushed_to"][0], "vma-1");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = json(&tf(&admin, &token, &["rollout", "--json"]).await);
        if r["applied"] == serde_json::json!(["vma-1"]) {
            assert_eq!(r["version"], 2);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollout never completed: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agents = json(&tf(&admin, &token, &["agents", "list", "--json"]).await);
    assert_eq!(
        (agents[0]["id"].as_str(), agents[0]["online"].as_bool()),
        (Some("vma-1"), Some(true))
    );
    assert_eq!(agents[0]["applied_version"], 2);
    let human = tf(&admin, &token, &["agents", "list"]).await;
    assert!(String::from_utf8_lossy(&human.stdout).contains("online"));
    // tunnels --agent: through the coordinator to the agent and back.
    let o = tf(
        &admin,
        &token,
        &["tunnels", "restart", "oma", "--agent", "vma-1", "--json"],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last =
        |asked: &std::sync::Mutex<Vec<(String, String)>>| asked.lock().unwrap().last().cloned();
    assert_eq!(last(&asked), Some(("Restart".into(), "oma".into())));
    // The agent's answer passed through whole.
    assert_eq!(json(&o)["message"], "Restart oma");
    let o = tf(
        &admin,
        &token,
        &["tunnels", "health", "other", "--agent", "vma-1"],
    )
    .await;
    // The agent said no: exit 1, its answer printed after the agent's name.
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(last(&asked), Some(("Health".into(), "other".into())));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "vma-1: Health other"
    );
    let o = tf(
        &admin,
        &token,
        &["tunnels", "stop", "oma", "--agent", "vma-404"],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not connected"));
    assert_eq!(
        last(&asked),
        Some(("Health".into(), "other".into())),
        "a command for an agent that is not there reached another"
    );
    let o = tf(
        &admin,
        &token,
        &["tunnels", "status", "--agent", "vma-1", "--json"],
    )
    .await;
    assert_eq!(json(&o)["id"], "vma-1");
    let o = tf(&admin, &token, &["tunnels", "status", "--agent", "vma-1"]).await;
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("agent vma-1: online"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // net check and audit run on the agent.
    let o = tf(
        &admin,
        &token,
        &["net", "check", "--agent", "vma-1", "--json"],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(last(&asked), Some(("NetCheck".into(), String::new())));
    assert_eq!(json(&o)["action"], "NetCheck");
    let before = asked.lock().unwrap().len();
    let o = tf(&admin, &token, &["audit", "--all", "--json"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // `--all`: one audit per connected agent (one here), keyed by agent in the CLI's output.
    assert_eq!(
        asked.lock().unwrap()[before..].to_vec(),
        vec![("Audit".to_string(), String::new())]
    );
    assert!(
        json(&o).as_object().unwrap().keys().eq(["vma-1"]),
        "{}",
        json(&o)
    );
    let o = tf(&admin, &token, &["audit", "--agent", "vma-1"]).await;
    assert!(String::from_utf8_lossy(&o.stdout).contains("== agent vma-1"));

    // watch: one refresh, as JSON and as the screen.
    let o = tf(&admin, &token, &["watch", "--count", "1", "--json"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["agents"][0]["id"], "vma-1");
    let o = tf(
        &admin,
        &token,
        &["watch", "--count", "2", "--interval", "10ms"],
    )
    .await;
    let screen = String::from_utf8_lossy(&o.stdout);
    assert_eq!(screen.matches("\x1b[2J").count(), 2, "{screen}");
    assert!(screen.contains("agents 1/1 online"), "{screen}");

    // A bad profile file is refused before anything is sent, naming the file and key.
    std::fs::write(dir.path().join("bad.toml"), "[[profile]]\nname = \"x\"\nendpoints = []\nuser = \"u\"\nidentity_file = \"/k\"\nknown_hosts = \"/kh\"\nforwards = [\"L 1:a:2\"]\n").unwrap();
    let o = tf(
        &admin,
        &token,
        &[
            "profiles",
            "apply",
            "-f",
            dir.path().join("bad.toml").to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.toml: profile.x.endpoints"));
    assert_eq!(
        json(&tf(&admin, &token, &["profiles", "list", "--json"]).await)
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A wrong token is refused; an unreachable coordinator exits 3.
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token-at-all").unwrap();
    let o = tf(&admin, &wrong, &["agents", "list"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // profiles diff: a known change, planned before anything is applied.
    let changed = dir.path().join("oma-v2.toml");
    std::fs::write(
        &changed,
        "[[profile]]\nname = \"oma\"\nendpoints = [\"oma-a:443\", \"oma-b:443\"]\nuser = \"vma\"\nidentity_file = \"/etc/tunnelfleet/id\"\n\
         known_hosts = \"/etc/tunnelfleet/known_hosts\"\nforwards = [\"L 8082:localhost:8082\", \"L 10809:localhost:10809\"]\n\n\
         [[profile]]\nname = \"nbd\"\nendpoints = [\"oma-a:443\"]\nuser = \"vma\"\nidentity_file = \"/etc/tunnelfleet/id\"\n\
         known_hosts = \"/etc/tunnelfleet/known_hosts\"\nforwards = [\"L 10808:localhost:10809\"]\n",
    )
    .unwrap();
    let f = changed.to_str().unwrap();
    let o = tf(
        &admin,
        &token,
        &["profiles", "diff", "-f", f, "--json", "--detailed-exitcode"],
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let plan = json(&o);
    assert_eq!(plan["version"], 2);
    assert_eq!(plan["profiles"][0]["action"], "change");
    assert_eq!(
        plan["profiles"][0]["forwards_added"],
        serde_json::json!(["L 10809:localhost:10809"])
    );
    assert_eq!(
        plan["profiles"][0]["forwards_removed"],
        serde_json::json!(["R 9081:localhost:8081"])
    );
    assert_eq!(plan["profiles"][0]["session_restarts"], false);
    assert_eq!(plan["profiles"][0]["agents"], serde_json::json!(["vma-1"]));
    assert_eq!(plan["profiles"][1]["action"], "create");
    assert_eq!(plan["agents_affected"], serde_json::json!(["vma-1"]));
    let human = tf(&admin, &token, &["profiles", "diff", "-f", f]).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success());
    assert!(
        text.contains("~ oma (change)")
            && text.contains("+ forward L 10809:localhost:10809")
            && text.contains("- forward R 9081:localhost:8081"),
        "{text}"
    );
    // Nothing was applied by the diff.
    assert_eq!(
        json(&tf(&admin, &token, &["profiles", "list", "--json"]).await)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Applied, the same diff says there is nothing left to do.
    assert!(
        tf(&admin, &token, &["profiles", "apply", "-f", f])
            .await
            .status
            .success()
    );
    let o = tf(
        &admin,
        &token,
        &["profiles", "diff", "-f", f, "--detailed-exitcode"],
    )
    .await;
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no changes"));

    // History, and a rollback to version 2 (before the change) as a new version.
    let h = json(&tf(&admin, &token, &["profiles", "history", "--json"]).await);
    assert_eq!(h[0]["version"], 4);
    assert_eq!(h[0]["what"], "profile nbd applied");
    assert_eq!(h[3]["version"], 1);
    let o = tf(&admin, &token, &["profiles", "rollback", "2", "--json"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["version"], 5);
    let list = json(&tf(&admin, &token, &["profiles", "list", "--json"]).await);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["forwards"][1], "R 9081:localhost:8081");
    let h = json(
        &tf(
            &admin,
            &token,
            &["profiles", "history", "--limit", "1", "--json"],
        )
        .await,
    );
    assert!(
        h[0]["what"]
            .as_str()
            .unwrap()
            .starts_with("rollback to version 2")
    );
    let o = tf(&admin, &token, &["profiles", "rollback", "999"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no revision 999"));

    let o = tf(&admin, &token, &["profiles", "delete", "oma", "--json"]).await;
    assert_eq!(json(&o)["version"], 6);
    let o = tf(&admin, &token, &["profiles", "delete", "oma"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no profile named \"oma\""));

    stop.cancel();
    coordinator.await.unwrap();
    agent.abort();
    let o = tf(&admin, &token, &["agents", "list"]).await;
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
