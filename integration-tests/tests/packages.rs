//! The Debian packages as an ops team installs them. `ops/deploy/debian/build-debs` builds
//! them from this build's binaries; dpkg installs them into this machine (so only under CI and
//! as root); the files, owners and modes, conffiles, man pages and completions are checked and
//! the units pass `systemd-analyze verify`; the installed coordinator and agent start from the
//! installed paths, as the `tunnelfleet` user, with the installed configs adapted by the
//! commands the README documents (`tunnelfleet pki init`, `tunnelfleet config set`), and the
//! agent enrolls; then a purge leaves no file, directory or user behind.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use integration_tests::SpawnOwned;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use integration_tests::programs::KillOnDrop;
use integration_tests::{Program, free_port, wait_until};

const PACKAGES: [&str; 3] = [
    "tunnelfleet",
    "tunnelfleet-agent",
    "tunnelfleet-coordinator",
];

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// The uid and gid of a user, from the passwd database.
fn user(name: &str) -> Option<(u32, u32)> {
    let out = Command::new("getent")
        .args(["passwd", name])
        .output()
        .ok()?;
    let line = String::from_utf8(out.stdout).ok()?;
    let fields: Vec<&str> = line.trim().split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

/// Mode, owner and group of an installed path.
fn assert_owned(path: &str, mode: u32, uid: u32, gid: u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        (m.permissions().mode() & 0o7777, m.uid(), m.gid()),
        (mode, uid, gid),
        "{path}: mode {:o}, owner {}:{}",
        m.permissions().mode() & 0o7777,
        m.uid(),
        m.gid()
    );
}

/// Purges whatever an earlier, interrupted run left installed.
fn purge() -> Output {
    Command::new("dpkg")
        .arg("--purge")
        .args(PACKAGES)
        .output()
        .unwrap()
}

fn needs() -> Option<String> {
    // The effective uid, from procfs (the workspace forbids unsafe, so no geteuid()).
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if std::env::var_os("CI").is_none() {
        return Some("installs packages into this machine: runs under CI (.ci/run) only".into());
    }
    if !root {
        return Some("dpkg -i needs root".into());
    }
    [
        "/usr/bin/dpkg-deb",
        "/usr/bin/systemd-analyze",
        "/usr/sbin/useradd",
    ]
    .into_iter()
    .find(|tool| !Path::new(tool).exists())
    .map(|tool| format!("{tool} is missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_install_start_and_purge_cleanly() {
    if let Some(why) = needs() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but the package test cannot run: {why}");
        }
        integration_tests::skip::skipped("the Debian packages", &why);
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = tempfile::tempdir().unwrap();
    let bins = work.path().join("bin");
    std::fs::create_dir(&bins).unwrap();
    for (name, program) in [
        ("tunnelfleet", Program::Cli),
        ("tunnelfleet-agent", Program::Agent),
        ("tunnelfleet-coordinator", Program::Coordinator),
    ] {
        std::os::unix::fs::symlink(program.path(), bins.join(name)).unwrap();
    }
    let debs = work.path().join("debs");
    let built = stdout(
        Command::new(root.join("ops/deploy/debian/build-debs"))
            .arg("--bin-dir")
            .arg(&bins)
            .arg("--out")
            .arg(&debs)
            .args(["--compress", "none"]),
    );
    let files: Vec<&str> = built.lines().collect();
    assert_eq!(files.len(), 3, "{built}");

    purge();
    run(Command::new("dpkg").arg("-i").args(&files));
    let (uid, gid) = user("tunnelfleet").expect("the package made the tunnelfleet user");
    // The checks run as a task of their own, so that their panic still lets the purge run.
    let outcome = tokio::spawn(installed(uid, gid, work.path().to_path_buf())).await;

    // Purged, nothing is left: binaries, config, state, the user.
    let _ = std::fs::remove_dir_all("/run/tunnelfleet");
    let out = purge();
    assert!(out.status.success(), "{out:?}");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    for path in [
        "/usr/bin/tunnelfleet",
        "/usr/bin/tunnelfleet-agent",
        "/usr/bin/tunnelfleet-coordinator",
        "/lib/systemd/system/tunnelfleet-agent.service",
        "/etc/tunnelfleet",
        "/var/lib/tunnelfleet",
        "/usr/share/doc/tunnelfleet-coordinator",
        "/usr/share/man/man1/tunnelfleet.1.gz",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after purge");
    }
    assert_eq!(user("tunnelfleet"), None, "the user is left after purge");
    for p in PACKAGES {
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", p])
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&status.stdout);
        assert!(
            status.is_empty() || status == "not-installed",
            "{p}: {status}"
        );
    }
}

async fn installed(uid: u32, gid: u32, work: std::path::PathBuf) {
    // Files, owners and modes.
    for bin in [
        "/usr/bin/tunnelfleet",
        "/usr/bin/tunnelfleet-agent",
        "/usr/bin/tunnelfleet-coordinator",
    ] {
        assert_owned(bin, 0o755, 0, 0);
    }
    assert_owned("/etc/tunnelfleet", 0o750, 0, gid);
    assert_owned("/etc/tunnelfleet/agent.toml", 0o640, 0, gid);
    assert_owned("/etc/tunnelfleet/coordinator.toml", 0o640, 0, gid);
    assert_owned("/etc/tunnelfleet/pki", 0o700, uid, gid);
    assert_owned("/etc/tunnelfleet/admin.token", 0o600, uid, gid);
    assert_owned("/var/lib/tunnelfleet", 0o700, uid, gid);
    assert_owned("/var/lib/tunnelfleet/agent", 0o700, uid, gid);
    assert_owned("/var/lib/tunnelfleet/coordinator", 0o700, uid, gid);
    assert!(uid < 1000, "a system user: uid {uid}");
    let passwd = stdout(Command::new("getent").args(["passwd", "tunnelfleet"]));
    assert!(passwd.trim().ends_with("/usr/sbin/nologin"), "{passwd}");
    for (package, conffile) in [
        ("tunnelfleet-agent", "/etc/tunnelfleet/agent.toml"),
        (
            "tunnelfleet-coordinator",
            "/etc/tunnelfleet/coordinator.toml",
        ),
    ] {
        let conffiles = stdout(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", package]));
        assert!(conffiles.contains(conffile), "{package}: {conffiles}");
    }
    for path in [
        "/lib/systemd/system/tunnelfleet-agent.service",
        "/lib/systemd/system/tunnelfleet-coordinator.service",
        "/usr/lib/sysctl.d/90-tunnelfleet-coordinator.conf",
        "/usr/share/man/man1/tunnelfleet.1.gz",
        "/usr/share/man/man1/tunnelfleet-agents-list.1.gz",
        "/usr/share/man/man1/tunnelfleet-agent.1.gz",
        "/usr/share/man/man1/tunnelfleet-coordinator.1.gz",
        "/usr/share/bash-completion/completions/tunnelfleet",
        "/usr/share/zsh/vendor-completions/_tunnelfleet",
        "/usr/share/fish/vendor_completions.d/tunnelfleet.fish",
        "/lib/systemd/system/tunnelfleet-oma-sync@.timer",
        "/usr/share/doc/tunnelfleet-coordinator/copyright",
        "/usr/share/doc/tunnelfleet-coordinator/examples/coordinator.toml",
        "/usr/share/doc/tunnelfleet-agent/examples/agent.toml",
    ] {
        assert_owned(path, 0o644, 0, 0);
    }
    let unit = std::fs::read_to_string("/lib/systemd/system/tunnelfleet-agent.service").unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/tunnelfleet-agent ") && !unit.contains("/usr/local/"),
        "{unit}"
    );
    // The units as systemd reads them: every directive known, every binary there.
    run(Command::new("systemd-analyze").args([
        "verify",
        "--man=no",
        "/lib/systemd/system/tunnelfleet-agent.service",
        "/lib/systemd/system/tunnelfleet-coordinator.service",
        "/lib/systemd/system/tunnelfleet-oma-sync@.service",
        "/lib/systemd/system/tunnelfleet-oma-sync@.timer",
    ]));
    // The man page is a man page: its name and synopsis come from the clap definitions.
    let page = stdout(
        Command::new("sh")
            .arg("-c")
            .arg("gzip -dc /usr/share/man/man1/tunnelfleet-agent.1.gz"),
    );
    assert!(page.contains(".TH tunnelfleet-agent 1"), "{page}");
    assert!(page.contains("\\-\\-config"), "{page}");

    // The coordinator, set up as the README says: its PKI made by its own user, its listeners
    // moved (here to free ports), started as the unit starts it.
    let as_service = |cmd: &mut Command| {
        cmd.uid(uid)
            .gid(gid)
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
    };
    let mut init = Command::new("/usr/bin/tunnelfleet");
    init.args([
        "pki",
        "init",
        "--dir",
        "/etc/tunnelfleet/pki",
        "--name",
        "localhost",
        "--name",
        "127.0.0.1",
        "--json",
    ]);
    as_service(&mut init);
    let printed: serde_json::Value = serde_json::from_str(&stdout(&mut init)).unwrap();
    let fingerprint = printed["ca_fingerprint"]
        .as_str()
        .unwrap_or_else(|| panic!("pki init --json: {printed}"))
        .to_string();
    let (quic, admin, metrics, web) = (free_port(), free_port(), free_port(), free_port());
    run(Command::new("/usr/bin/tunnelfleet").args([
        "config",
        "set",
        "/etc/tunnelfleet/coordinator.toml",
        &format!("listen=127.0.0.1:{quic}"),
        &format!("admin_listen=127.0.0.1:{admin}"),
        &format!("metrics_listen=127.0.0.1:{metrics}"),
        &format!("web_listen=127.0.0.1:{web}"),
    ]));
    assert_owned("/etc/tunnelfleet/coordinator.toml", 0o640, 0, gid);
    let mut coordinator = integration_tests::children::owned("/usr/bin/tunnelfleet-coordinator");
    coordinator
        .args(["--config", "/etc/tunnelfleet/coordinator.toml"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("coordinator.log")).unwrap());
    as_service(&mut coordinator);
    let _coordinator = KillOnDrop(coordinator.spawn_owned().unwrap());
    let cli = |args: &[&str]| -> Output {
        Command::new("/usr/bin/tunnelfleet")
            .args(args)
            .args(["--coordinator", &format!("127.0.0.1:{admin}"), "--json"])
            .output()
            .unwrap()
    };
    wait_until(30, "the installed coordinator's admin API", || async {
        cli(&["agents", "list"]).status.success()
    })
    .await;

    // The agent, set up as the README says: the coordinator's address and CA fingerprint in
    // its config, a join token beside it; started as the unit starts it (its runtime
    // directory is what systemd's RuntimeDirectory= makes).
    let token = cli(&["token", "create", "--ttl", "10m"]);
    assert!(token.status.success(), "{token:?}");
    let token: serde_json::Value = serde_json::from_slice(&token.stdout).unwrap();
    let token = token["token"].as_str().unwrap();
    let mut write_token = Command::new("install");
    write_token
        .args(["-m", "0600", "-o", "tunnelfleet", "/dev/stdin"])
        .arg("/etc/tunnelfleet/join.token")
        .stdin(Stdio::piped());
    let mut child = write_token.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    run(Command::new("/usr/bin/tunnelfleet").args([
        "config",
        "set",
        "/etc/tunnelfleet/agent.toml",
        &format!("coordinator.address=127.0.0.1:{quic}"),
        "coordinator.agent_id=vma-packaged",
        &format!("coordinator.ca_fingerprint={fingerprint}"),
    ]));
    std::fs::create_dir_all("/run/tunnelfleet").unwrap();
    std::os::unix::fs::chown("/run/tunnelfleet", Some(uid), Some(gid)).unwrap();
    let mut check = Command::new("/usr/bin/tunnelfleet-agent");
    check.args(["--config", "/etc/tunnelfleet/agent.toml", "--check"]);
    as_service(&mut check);
    run(&mut check);
    let mut agent = integration_tests::children::owned("/usr/bin/tunnelfleet-agent");
    agent
        .args(["--config", "/etc/tunnelfleet/agent.toml"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("agent.log")).unwrap());
    as_service(&mut agent);
    let _agent = KillOnDrop(agent.spawn_owned().unwrap());
    wait_until(30, "the installed agent enrolled and online", || async {
        let out = cli(&["agents", "list"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.as_array().is_some_and(|agents| {
            agents
                .iter()
                .any(|a| a["id"] == "vma-packaged" && a["online"] == true)
        })
    })
    .await;
    assert_owned("/var/lib/tunnelfleet/agent/pki/agent.key", 0o600, uid, gid);
}
