//! The `tunnelfleet tunnels …` commands end to end: the real binary against a running agent
//! (behind an embedded OMA), asserting on `--json` output and exit codes.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Output;

use russh::keys::{Algorithm, PrivateKey};
use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_standins::embedded_oma::{EmbeddedOma, OmaSpec};
use tunnelfleet_standins::services::HttpService;

async fn cli(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnelfleet"));
    cmd.arg("tunnels").args(args).arg("--socket").arg(socket);
    cmd.output().await.expect("run tunnelfleet")
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_commands_with_json_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let key_path = dir.path().join("id");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .unwrap();
    f.write_all(key.to_openssh(Default::default()).unwrap().as_bytes())
        .unwrap();
    let api = HttpService::start("api", 0).await.unwrap();
    let oma = EmbeddedOma::start(OmaSpec {
        name: "oma".into(),
        authorized: key.public_key().clone(),
        services: HashMap::from([(8082, SocketAddr::from(([127, 0, 0, 1], api.port)))]),
    })
    .await
    .unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let socket = dir.path().join("agent.sock");
    let text = format!(
        "[agent]\ncontrol_socket = \"{}\"\n[[profile]]\nname = \"oma\"\ndescription = \"the OMA\"\nendpoints = [\"127.0.0.1:{}\"]\n\
         user = \"vma\"\nidentity_file = \"{}\"\nhost_key_fingerprints = [\"{}\"]\nforwards = [\"L {l}:localhost:8082\"]\n\
         [profile.health]\nhttp = \"http://127.0.0.1:{l}/health\"\n",
        socket.display(),
        oma.port,
        key_path.display(),
        oma.fingerprint
    );
    let cfg = AgentConfig::parse(&text, Path::new("t.toml")).unwrap();
    let agent = tunnelfleet_agent::agent::Agent::prepare(&cfg)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = cli(&socket, &["status", "--json"]).await;
        assert!(o.status.success());
        if json(&o)["profiles"][0]["state"] == "up" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "profile never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let o = cli(&socket, &["list"]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("oma") && out.contains("the OMA"),
        "{out}"
    );
    let o = cli(&socket, &["status"]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("(primary)") && out.contains(&format!("L 127.0.0.1:{l}:localhost:8082")),
        "{out}"
    );

    let o = cli(&socket, &["health", "oma", "--json"]).await;
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(json(&o)["ok"], true);
    api.failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let o = cli(&socket, &["health", "oma"]).await;
    assert_eq!(o.status.code(), Some(1), "a failing check exits 1");
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL HTTP 503"));

    let o = cli(&socket, &["stop", "oma", "--json"]).await;
    assert_eq!(json(&o)["message"], "oma stopped");
    let o = cli(&socket, &["status", "--json"]).await;
    assert_eq!(json(&o)["profiles"][0]["state"], "stopped");
    let o = cli(&socket, &["start", "oma"]).await;
    assert!(o.status.success());
    let o = cli(&socket, &["restart", "nope"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no profile named \"nope\""));

    // seed 004's stop-all, and the live monitor (one refresh, as JSON lines).
    let o = cli(&socket, &["stop", "--all"]).await;
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("oma stopped"));
    let o = cli(
        &socket,
        &["monitor", "--count", "2", "--interval", "10ms", "--json"],
    )
    .await;
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["profiles"][0]["state"], "stopped");
    let o = cli(&socket, &["start", "--all"]).await;
    assert!(String::from_utf8_lossy(&o.stdout).contains("oma started"));
    let o = cli(&socket, &["monitor", "--count", "1"]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("tunnelfleet monitor") && out.contains("oma"),
        "{out}"
    );
    let o = cli(&socket, &["stop"]).await;
    assert_eq!(o.status.code(), Some(2), "a name or --all is required");

    stop.cancel();
    task.await.unwrap();
    let o = cli(&socket, &["status"]).await;
    assert_eq!(o.status.code(), Some(3), "agent unreachable exits 3");
    assert!(String::from_utf8_lossy(&o.stderr).contains("agent.sock"));
}
