//! Every shipped example config is accepted; every config in `configs/invalid/` is refused
//! whole with the message its first line (`# expect: …`) names; start-time refusals name the
//! offending file or socket and start nothing.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tunnelfleet_agent::agent::Agent;
use tunnelfleet_agent::config::AgentConfig;

fn files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no configs in {}", root.display());
    v
}

#[test]
fn every_shipped_example_config_is_accepted() {
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/debian/agent.toml");
    for path in files("../ops/examples").into_iter().chain([packaged]) {
        let cfg = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        // Something to run: local profiles, or a coordinator to push them.
        assert!(
            !cfg.profiles.is_empty() || cfg.coordinator.is_some(),
            "{}",
            path.display()
        );
    }
}

#[test]
fn every_shipped_coordinator_config_is_accepted() {
    let mut groups = 0;
    for path in files("../ops/examples/coordinator") {
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("groups"))
        {
            groups += tunnelfleet_ops::cli::oma::load_groups(&path)
                .unwrap_or_else(|e| panic!("{e:#}"))
                .len();
            continue;
        }
        let cfg = tunnelfleet_coordinator::server::CoordinatorConfig::load(&path)
            .unwrap_or_else(|e| panic!("{e:#}"));
        for h in &cfg.hooks {
            // Everything but the secret files, which exist only on a real coordinator.
            let mut h = h.clone();
            h.secret_file = None;
            h.password_file = None;
            h.username = None;
            tunnelfleet_coordinator::hooks::Hook::from_config(&h)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    assert!(groups > 0, "no example groups file");
    // The one the package installs as /etc/tunnelfleet/coordinator.toml.
    tunnelfleet_coordinator::server::CoordinatorConfig::load(std::path::Path::new(
        "../ops/deploy/debian/coordinator.toml",
    ))
    .unwrap_or_else(|e| panic!("{e:#}"));
    // The high-availability layout's coordinator config loads too.
    let ha = tunnelfleet_coordinator::server::CoordinatorConfig::load(std::path::Path::new(
        "../ops/deploy/ha/coordinator.toml",
    ))
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        ha.store,
        tunnelfleet_coordinator::server::StoreKind::Etcd,
        "ops/deploy/ha/coordinator.toml"
    );
    assert_eq!(ha.etcd.map(|e| e.endpoints.len()), Some(3));
}

#[test]
fn every_invalid_config_is_refused_with_its_expected_message() {
    for path in files("configs/invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be '# expect: …'", path.display()));
        let err = AgentConfig::load(&path)
            .err()
            .unwrap_or_else(|| panic!("{} was accepted", path.display()))
            .to_string();
        assert!(
            err.contains(expect),
            "{}:\n  expected: {expect}\n  got:      {err}",
            path.display()
        );
        assert!(
            err.contains(&path.display().to_string()),
            "error must name the file: {err}"
        );
    }
}

fn profile(dir: &Path, key: &Path) -> String {
    format!(
        "[agent]\ncontrol_socket = \"{}\"\n[[profile]]\nname = \"p\"\nendpoints = [\"127.0.0.1:1\"]\nuser = \"u\"\n\
         identity_file = \"{}\"\nhost_key_fingerprints = [\"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\"]\n\
         forwards = [\"L 0.0.0.0:1:a:2\"]\n",
        dir.join("agent.sock").display(),
        key.display()
    )
}

#[tokio::test]
async fn a_key_readable_by_others_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    integration_tests::keygen(&key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = AgentConfig::parse(&profile(dir.path(), &key), Path::new("a.toml")).unwrap();
    let err = Agent::prepare(&cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("profile p") && err.contains(&key.display().to_string()),
        "{err}"
    );
    assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");
    assert!(!dir.path().join("agent.sock").exists(), "nothing may start");
}

#[tokio::test]
async fn a_second_agent_on_the_same_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    integration_tests::keygen(&key);
    let cfg = AgentConfig::parse(&profile(dir.path(), &key), Path::new("a.toml")).unwrap();
    let first = Agent::prepare(&cfg).await.expect("first agent");
    let mode = std::fs::metadata(dir.path().join("agent.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let err = Agent::prepare(&cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("another agent is already running") && err.contains("agent.sock"),
        "{err}"
    );
    drop(first);
}

/// A coordinator config with a typo'd UDP buffer is refused at start, naming the key.
#[tokio::test]
async fn a_coordinator_with_a_tiny_udp_buffer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    integration_tests::write_secret(&token, b"0123456789abcdef0123");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\npki_dir = \"{0}/pki\"\nstate_dir = \"{0}/state\"\nadmin_token_file = \"{1}\"\nudp_buffer = 4096\n",
        dir.path().display(),
        token.display()
    );
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = tunnelfleet_coordinator::server::CoordinatorConfig::load(&path).unwrap();
    let err = match tunnelfleet_coordinator::server::bind(&cfg).await {
        Ok(_) => panic!("a 4 KiB udp_buffer was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.starts_with("udp_buffer: 4096 bytes"), "{err}");
    assert!(!dir.path().join("state").exists(), "the store was opened");
}

/// The admin API speaks plain HTTP and takes a bearer token: on anything but loopback the token
/// would cross the network in clear, so such an `admin_listen` is refused at start, naming the
/// key, unless the operator says so explicitly.
#[tokio::test]
async fn a_plaintext_admin_api_off_loopback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    integration_tests::write_secret(&token, b"0123456789abcdef0123");
    let config = |extra: &str| {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\npki_dir = \"{0}/pki\"\nstate_dir = \"{0}/state\"\nadmin_token_file = \"{1}\"\n{extra}",
            dir.path().display(),
            token.display()
        );
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        tunnelfleet_coordinator::server::CoordinatorConfig::load(&path).unwrap()
    };
    let err = match tunnelfleet_coordinator::server::bind(&config("")).await {
        Ok(_) => panic!("a plaintext admin API on 0.0.0.0 was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.starts_with("admin_listen: 0.0.0.0:0 is not loopback"),
        "{err}"
    );
    assert!(err.contains("admin_plaintext_on_network"), "{err}");
    assert!(!dir.path().join("state").exists(), "the store was opened");
    // Allowed explicitly: it starts.
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let bound =
        tunnelfleet_coordinator::server::bind(&config("admin_plaintext_on_network = true\n"))
            .await
            .unwrap();
    assert!(!bound.admin.ip().is_loopback());
}

/// An unauthenticated request is refused before its body is read: a malformed body without a
/// token is 401, never 422 (which would tell a stranger the route and its schema).
#[tokio::test]
async fn an_unauthenticated_malformed_request_is_401() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let c = integration_tests::FullCoordinator::start(
        dir.path(),
        std::time::Duration::from_millis(500),
        vec![],
    )
    .await;
    let addr = c.api.addr().to_string();
    for (method, path) in [
        ("PUT", "/v1/profiles/x"),
        ("POST", "/v1/tokens"),
        ("PUT", "/v1/groups/g"),
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let body = "{not json";
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 401"), "{method} {path}: {resp}");
    }
    c.stop().await;
}
