//! The `tunnelfleet-agent` binary itself: bad configs refused with the file named and exit 1,
//! `--check`, and SIGTERM shutting down cleanly (exit 0, socket removed, ports released).

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tunnelfleet-agent");

fn write_key(dir: &Path) -> std::path::PathBuf {
    let key =
        russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
    let path = dir.join("id");
    std::fs::write(
        &path,
        key.to_openssh(Default::default()).unwrap().as_bytes(),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn config(dir: &Path, port: u16, forward: &str) -> std::path::PathBuf {
    let key = write_key(dir);
    let text = format!(
        "[agent]\ncontrol_socket = \"{}/run/agent.sock\"\n[[profile]]\nname = \"oma\"\n\
         endpoints = [\"127.0.0.1:{port}\"]\nuser = \"u\"\nidentity_file = \"{}\"\n\
         host_key_fingerprints = [\"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\"]\nforwards = [\"{forward}\"]\n",
        dir.display(),
        key.display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_config_exits_1_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, "L 8082:localhost");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&cfg.display().to_string()) && err.contains("profile.oma.forwards[0]"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists(), "nothing may start");
    let missing = Command::new(BIN)
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/agent.toml: cannot read")
    );
}

#[test]
fn check_validates_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, "L 1:localhost:2");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 profiles)"));
}

#[test]
fn sigterm_stops_gracefully_removing_the_socket_and_releasing_ports() {
    let dir = tempfile::tempdir().unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The endpoint refuses connections: the agent keeps retrying, listener bound meanwhile.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(dir.path(), closed, &format!("L {l}:localhost:2"));
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = dir.path().join("run/agent.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(socket.exists() && std::net::TcpStream::connect(("127.0.0.1", l)).is_ok()) {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(socket.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "agent did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(!socket.exists(), "socket left behind");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", l)).is_ok(),
        "port {l} still bound"
    );
    // JSON logs: one object per line, the refusal of the endpoint logged with its cause.
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some());
    }
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(
        log.contains(&format!("connect to 127.0.0.1:{closed}")),
        "{log}"
    );
}
