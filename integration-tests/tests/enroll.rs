//! Enrollment and revocation end to end with the real binaries: a `tunnelfleet-coordinator`
//! process, `tunnelfleet token …` and `tunnelfleet agents revoke …` from the CLI, and
//! `tunnelfleet-agent` processes that start with nothing but a join token and the CA's pinned
//! fingerprint.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use integration_tests::SpawnOwned;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use integration_tests::{CoordinatorProcess, Program, wait_until, write_secret};
use tunnelfleet_coordinator::pki;

fn cli(c: &CoordinatorProcess, args: &[&str]) -> Output {
    Command::new(Program::Cli.path())
        .args(args)
        .arg("--coordinator")
        .arg(c.admin.to_string())
        .arg("--token-file")
        .arg(&c.token_file)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// An agent's files and config; nothing of its identity exists until it enrolls.
struct NewAgent {
    dir: PathBuf,
    config: PathBuf,
}

impl NewAgent {
    fn cert(&self) -> PathBuf {
        self.dir.join("agent.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("agent.key")
    }
}

fn new_agent(root: &Path, c: &CoordinatorProcess, id: &str, token: &str, fp: &str) -> NewAgent {
    new_agent_in(&root.join(id), c, id, token, fp)
}

fn new_agent_in(dir: &Path, c: &CoordinatorProcess, id: &str, token: &str, fp: &str) -> NewAgent {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("join.token");
    write_secret(&token_file, token.as_bytes());
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ncontrol_socket = \"{dir}/agent.sock\"\n\n[coordinator]\naddress = \"{}\"\nserver_name = \"localhost\"\n\
             agent_id = \"{id}\"\nlabels = {{ role = \"vma\" }}\nca = \"{dir}/ca.pem\"\ncert = \"{dir}/agent.pem\"\nkey = \"{dir}/agent.key\"\n\
             state_dir = \"{dir}/state\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
             enroll_token_file = \"{}\"\nca_fingerprint = \"{fp}\"\n",
            c.control,
            token_file.display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    NewAgent { dir, config }
}

fn spawn_agent(a: &NewAgent) -> Child {
    integration_tests::children::owned(Program::Agent.path())
        .arg("--config")
        .arg(&a.config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(a.dir.join("agent.log")).unwrap())
        .spawn_owned()
        .unwrap()
}

/// Runs an agent that must fail to enroll; returns its log.
fn refused(a: &NewAgent) -> String {
    let mut child = spawn_agent(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent did not give up enrolling");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        !a.cert().exists() && !a.key().exists(),
        "nothing written: {log}"
    );
    log
}

fn agent<'a>(agents: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    agents.as_array().unwrap().iter().find(|a| a["id"] == id)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolls_with_a_token_once_and_bad_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fp = pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let c = CoordinatorProcess::start(dir.path(), "500ms").await;

    let t = json(&cli(
        &c,
        &[
            "token", "create", "--label", "site=dc1", "--ttl", "1h", "--json",
        ],
    ));
    let token = t["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("tfj_"), "{t}");
    // The coordinator keeps the hash only: the secret is nowhere in its state.
    let listed = json(&cli(&c, &["token", "list", "--json"]));
    assert_eq!(listed[0]["id"], t["id"]);
    assert!(!listed.to_string().contains(&token));

    // The new agent enrolls: its own key (0600), a certificate, and the labels of the token
    // (its own config's `role` selects nothing: only what the token granted counts).
    let a = new_agent(dir.path(), &c, "vma-new", &token, &fp);
    let _agent = Killed(spawn_agent(&a));
    wait_until(30, "the enrolled agent online", || async {
        let list = json(&cli(&c, &["agents", "list", "--json"]));
        agent(&list, "vma-new").is_some_and(|x| x["online"] == true)
    })
    .await;
    let list = json(&cli(&c, &["agents", "list", "--json"]));
    let labels = &agent(&list, "vma-new").unwrap()["labels"];
    assert_eq!(labels, &serde_json::json!({ "site": "dc1" }), "{list}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(a.key()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let cert = std::fs::read_to_string(a.cert()).unwrap();
    use quinn::rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    assert_eq!(
        tunnelfleet_coordinator::tls::agent_id(&der).unwrap(),
        "vma-new"
    );
    let listed = json(&cli(&c, &["token", "list", "--json"]));
    assert_eq!(listed[0]["used_by"], "vma-new");

    // The same token again: refused, nothing written.
    let again = new_agent(dir.path(), &c, "vma-second", &token, &fp);
    let log = refused(&again);
    assert!(log.contains("already used"), "{log}");

    // An unknown token.
    let unknown = new_agent(dir.path(), &c, "vma-unknown", "tfj_notatoken", &fp);
    assert!(refused(&unknown).contains("unknown join token"));

    // An expired token.
    let short = json(&cli(&c, &["token", "create", "--ttl", "1s", "--json"]));
    let expires = short["expires_unix_ms"].as_u64().unwrap();
    wait_until(10, "the short token expired", || async {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            > expires
    })
    .await;
    let late = new_agent(
        dir.path(),
        &c,
        "vma-late",
        short["token"].as_str().unwrap(),
        &fp,
    );
    assert!(refused(&late).contains("expired"));

    // A coordinator that does not hold the pinned CA never sees the token: the agent refuses
    // it during the TLS handshake and the token stays unused.
    let other = pki::init(&dir.path().join("other-pki"), &["localhost".into()]).unwrap();
    let fresh = json(&cli(&c, &["token", "create", "--json"]));
    let wrong = new_agent(
        dir.path(),
        &c,
        "vma-wrongca",
        fresh["token"].as_str().unwrap(),
        &other,
    );
    let log = refused(&wrong);
    assert!(log.contains("ca_fingerprint"), "{log}");
    let listed = json(&cli(&c, &["token", "list", "--json"]));
    let f = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == fresh["id"])
        .unwrap();
    assert!(f["used_by"].is_null(), "{f}");

    // A known agent id cannot be taken over with a general token…
    let takeover = new_agent_in(
        &dir.path().join("vma-new-replacement"),
        &c,
        "vma-new",
        fresh["token"].as_str().unwrap(),
        &fp,
    );
    let log = refused(&takeover);
    assert!(log.contains("already enrolled"), "{log}");
    // …but a token made for it re-enrolls it (a replaced appliance).
    let own = json(&cli(
        &c,
        &["token", "create", "--agent", "vma-new", "--json"],
    ));
    write_secret(
        &takeover.dir.join("join.token"),
        own["token"].as_str().unwrap().as_bytes(),
    );
    // The old appliance is gone: its process stops.
    drop(_agent);
    let before = heartbeats(&c, "vma-new");
    let child = Killed(spawn_agent(&takeover));
    wait_until(30, "the re-enrolled agent's certificate", || async {
        takeover.cert().exists()
    })
    .await;
    // A new certificate for that id, issued by the fleet CA (verified against it as the
    // coordinator does), not the old one copied.
    let new_pem = std::fs::read_to_string(takeover.cert()).unwrap();
    assert_ne!(new_pem, cert, "the old certificate again");
    let new_der = CertificateDer::from_pem_slice(new_pem.as_bytes()).unwrap();
    assert_eq!(
        tunnelfleet_coordinator::tls::agent_id(&new_der).unwrap(),
        "vma-new"
    );
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("pki/ca.pem"))
        .arg(takeover.cert())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "not from the fleet CA: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // And the replacement connects with it: heartbeats from vma-new again, on a new link.
    wait_until(30, "the replacement's heartbeats", || async {
        heartbeats(&c, "vma-new") > 0 && heartbeats(&c, "vma-new") != before
    })
    .await;
    drop(child);
}

/// Heartbeats on `id`'s current connection, from `agents list`.
fn heartbeats(c: &CoordinatorProcess, id: &str) -> u64 {
    let list = json(&cli(c, &["agents", "list", "--json"]));
    agent(&list, id)
        .and_then(|x| x["heartbeats"].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_disconnected_at_once_and_refused_until_unrevoked() {
    let dir = tempfile::tempdir().unwrap();
    let fp = pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let c = CoordinatorProcess::start(dir.path(), "500ms").await;
    let t = json(&cli(&c, &["token", "create", "--json"]));
    let a = new_agent(
        dir.path(),
        &c,
        "vma-lost",
        t["token"].as_str().unwrap(),
        &fp,
    );
    let _agent = Killed(spawn_agent(&a));
    wait_until(30, "the agent online", || async {
        let list = json(&cli(&c, &["agents", "list", "--json"]));
        agent(&list, "vma-lost").is_some_and(|x| x["connected"] == true)
    })
    .await;

    let r = json(&cli(
        &c,
        &[
            "agents",
            "revoke",
            "vma-lost",
            "--reason",
            "appliance stolen",
            "--json",
        ],
    ));
    assert_eq!(r["agent"], "vma-lost");
    wait_until(15, "the revoked agent disconnected", || async {
        let list = json(&cli(&c, &["agents", "list", "--json"]));
        agent(&list, "vma-lost").is_some_and(|x| x["connected"] == false && x["revoked"] == true)
    })
    .await;
    // It keeps trying (with backoff) and is refused every time, with the reason.
    wait_until(15, "the agent told why", || async {
        std::fs::read_to_string(a.dir.join("agent.log"))
            .unwrap()
            .contains("is revoked: appliance stolen")
    })
    .await;
    let list = json(&cli(&c, &["agents", "list", "--json"]));
    assert_eq!(agent(&list, "vma-lost").unwrap()["connected"], false);
    let coordinator_log = c.log();
    assert!(coordinator_log.contains("revoked"), "{coordinator_log}");
    // Survives a restart of the coordinator (kill -9: it was durable when acknowledged): the
    // agent, still retrying, is refused by the restarted one too.
    let refusals = || {
        std::fs::read_to_string(a.dir.join("agent.log"))
            .unwrap()
            .matches("is revoked: appliance stolen")
            .count()
    };
    let mut c = c;
    c.kill9();
    let before = refusals();
    c.restart().await;
    let revs: serde_json::Value = c.api.get("/v1/revocations").await.unwrap();
    assert_eq!(revs[0]["agent"], "vma-lost");
    wait_until(30, "a refusal by the restarted coordinator", || async {
        refusals() > before
    })
    .await;
    let list = json(&cli(&c, &["agents", "list", "--json"]));
    assert_eq!(agent(&list, "vma-lost").unwrap()["connected"], false);

    let o = cli(&c, &["agents", "unrevoke", "vma-lost"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_until(30, "the agent back after unrevoke", || async {
        let list = json(&cli(&c, &["agents", "list", "--json"]));
        agent(&list, "vma-lost").is_some_and(|x| x["connected"] == true && x["revoked"] == false)
    })
    .await;
    // Unrevoking twice says so.
    let o = cli(&c, &["agents", "unrevoke", "vma-lost"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not revoked"));
}

/// Enrollment believes the token, not the caller: an id issued by hand with `pki issue-agent`
/// is known (an unrestricted token cannot enroll an impostor under it); a revoked id's state and
/// reason are told only to a caller with a valid token; the labels an enrolled agent declares
/// beyond its token's select nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_believes_the_token_not_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let fp = pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    pki::issue_agent(
        &dir.path().join("pki"),
        "vma-offline",
        30,
        &dir.path().join("off"),
    )
    .unwrap();
    let c = CoordinatorProcess::start(dir.path(), "500ms").await;
    let token = |args: &[&str]| {
        let mut a = vec!["token", "create", "--json"];
        a.extend_from_slice(args);
        json(&cli(&c, &a))["token"].as_str().unwrap().to_string()
    };

    let general = token(&[]);
    let impostor = new_agent(dir.path(), &c, "vma-offline", &general, &fp);
    let log = refused(&impostor);
    assert!(log.contains("already enrolled"), "{log}");

    // A revoked id: a caller without a valid token learns nothing about it.
    let o = cli(
        &c,
        &[
            "agents",
            "revoke",
            "vma-gone",
            "--reason",
            "stolen in transit",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prober = new_agent(dir.path(), &c, "vma-gone", "tfj_guess", &fp);
    let log = refused(&prober);
    assert!(log.contains("unknown join token"), "{log}");
    assert!(
        !log.contains("revoked") && !log.contains("stolen in transit"),
        "{log}"
    );
    // With a valid token the refusal says why (and the token stays unspent).
    let bound = token(&["--agent", "vma-gone"]);
    let holder = new_agent_in(&dir.path().join("holder"), &c, "vma-gone", &bound, &fp);
    let log = refused(&holder);
    assert!(log.contains("revoked: stolen in transit"), "{log}");
    let listed = json(&cli(&c, &["token", "list", "--json"]));
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["agent"] == "vma-gone")
            .all(|t| t["used_by"].is_null()),
        "{listed}"
    );

    // An enrolled agent declaring `role = "vma"` (its config) on top of its token's dc1: an
    // assignment by role does not reach it, one by site does.
    let site = token(&["--label", "site=dc1"]);
    let a = new_agent(dir.path(), &c, "vma-labels", &site, &fp);
    let _agent = Killed(spawn_agent(&a));
    wait_until(30, "the enrolled agent online", || async {
        let list = json(&cli(&c, &["agents", "list", "--json"]));
        agent(&list, "vma-labels").is_some_and(|x| x["online"] == true)
    })
    .await;
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "[[profile]]\nname = \"byrole\"\nendpoints = [\"oma-a:22\"]\nuser = \"vma\"\nidentity_file = \"/k\"\nknown_hosts = \"/kh\"\nforwards = [\"L 18082:localhost:8082\"]\n",
    )
    .unwrap();
    let o = cli(&c, &["profiles", "apply", "-f", profile.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let by_role = json(&cli(
        &c,
        &["assign", "byrole", "--label", "role=vma", "--json"],
    ));
    let version = by_role["version"].as_u64().unwrap();
    // Every agent gets every version; what it runs is in its cache once it applied it.
    wait_until(30, "the version applied", || async {
        let list = json(&cli(&c, &["agents", "list", "--json"]));
        agent(&list, "vma-labels").is_some_and(|x| x["applied_version"] == version)
    })
    .await;
    let cache = || {
        let path = tunnelfleet_agent::fleet::cache_path(&a.dir.join("state"));
        std::fs::read_to_string(path).unwrap()
    };
    assert!(
        !cache().contains("byrole"),
        "a label the token did not grant selected a profile: {}",
        cache()
    );
    // The positive control: the same profile by the granted label reaches it.
    let by_site = json(&cli(
        &c,
        &["assign", "byrole", "--label", "site=dc1", "--json"],
    ));
    let version = by_site["version"].as_u64().unwrap();
    wait_until(30, "the version by site applied", || async {
        let list = json(&cli(&c, &["agents", "list", "--json"]));
        agent(&list, "vma-labels").is_some_and(|x| x["applied_version"] == version)
    })
    .await;
    assert!(cache().contains("byrole"), "{}", cache());
    let list = json(&cli(&c, &["agents", "list", "--json"]));
    assert_eq!(
        agent(&list, "vma-labels").unwrap()["labels"],
        serde_json::json!({ "site": "dc1" }),
        "{list}"
    );
}
