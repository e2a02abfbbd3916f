//! `tunnelfleet profiles import` end to end, on the seeds' own text: seed 000's ssh command
//! line exactly as its document writes it (comments after the continuations included) and seed
//! 004's default profile file. The output must be a config the agent itself accepts.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;
use std::process::Output;

use tunnelfleet_agent::config::AgentConfig;

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn import(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tunnelfleet"))
        .args(["profiles", "import"])
        .args(args)
        .output()
        .unwrap()
}

fn notes(v: &serde_json::Value) -> Vec<String> {
    v["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_seed_ssh_command_becomes_one_profile_and_says_what_changed() {
    let file = data("seed000-ssh-command.sh");
    let o = import(&[file.to_str().unwrap(), "--name", "oma", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["profiles"][0];
    assert_eq!(v["profiles"].as_array().unwrap().len(), 1);
    assert_eq!(p["name"], "oma");
    assert_eq!(p["user"], "pgrayson");
    assert_eq!(p["endpoints"], serde_json::json!(["10.245.246.125:443"]));
    assert_eq!(p["identity_file"], "/home/vma/.ssh/cloudstack_key");
    assert_eq!(
        p["forwards"],
        serde_json::json!([
            "R 9081:localhost:8081",
            "L 8082:localhost:8082",
            "L 10809:localhost:10809",
            "L 10808:localhost:10809"
        ])
    );
    assert_eq!(p["keepalive_interval"], "30s");
    assert_eq!(p["keepalive_count"], 3);
    assert_eq!(p["connect_timeout"], "30s");
    assert_eq!(p["trust_on_first_use"], false);
    assert_eq!(p["known_hosts"], "/etc/tunnelfleet/known_hosts");
    let notes = notes(&v);
    for expected in [
        "StrictHostKeyChecking=no not carried over",
        "UserKnownHostsFile=/dev/null not carried over",
        "ExitOnForwardFailure=yes",
        "TCPKeepAlive=yes",
        "no health check",
    ] {
        assert!(
            notes.iter().any(|n| n.contains(expected)),
            "no note about {expected:?}: {notes:#?}"
        );
    }
    // BatchMode and -N are implied, not "dropped".
    assert!(
        !notes
            .iter()
            .any(|n| n.contains("BatchMode") || n.contains("-N")),
        "{notes:#?}"
    );

    // The TOML is a config the agent accepts, with the same profile.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profiles.toml");
    let o = import(&[
        file.to_str().unwrap(),
        "--name",
        "oma",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("note: oma (line 1): StrictHostKeyChecking=no"),
        "{stderr}"
    );
    let cfg = AgentConfig::load(&out).unwrap();
    assert_eq!(cfg.profiles.len(), 1);
    assert_eq!(cfg.profiles[0].forwards.len(), 4);
    // -o never overwrites.
    let again = import(&[file.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("must not exist"));
}

#[test]
fn the_seed_profile_file_becomes_one_profile_per_line() {
    let file = data("seed004-ssh-tunnels.conf");
    let o = import(&[file.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "jupyter-gpu1",
            "jupyter-gpu2",
            "tensorboard-gpu1",
            "mlflow",
            "postgres-db",
            "ray-dashboard"
        ]
    );
    let p = &v["profiles"][1];
    assert_eq!(p["endpoints"], serde_json::json!(["gpu2.example.com:22"]));
    assert_eq!(p["user"], "ml-user");
    assert_eq!(p["forwards"], serde_json::json!(["L 8889:localhost:8888"]));
    assert_eq!(p["description"], "Jupyter on GPU Server 2");
    // Notes carry the line each profile came from.
    let first = &v["notes"][0];
    assert_eq!(first["profile"], "jupyter-gpu1");
    assert_eq!(first["line"], 5);
    assert!(notes(&v).iter().any(|n| n.contains("identity file")));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.toml");
    assert!(
        import(&[file.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(AgentConfig::load(&out).unwrap().profiles.len(), 6);
}

#[test]
fn an_autossh_unit_line_from_stdin_and_bad_input_refused_with_the_line() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tunnelfleet"))
        .args(["profiles", "import", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"[Service]\nExecStart=/usr/bin/autossh -M 0 -N -J jump@bastion:2200,bastion2 -o ServerAliveInterval=10 -o StrictHostKeyChecking=accept-new -D 1080 ops@oma2.example -p 2222 sleep infinity\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["profiles"][0];
    assert_eq!(p["name"], "oma-oma2-example");
    assert_eq!(p["endpoints"], serde_json::json!(["oma2.example:2222"]));
    assert_eq!(p["forwards"], serde_json::json!(["D 1080"]));
    assert_eq!(p["trust_on_first_use"], true);
    let n = notes(&v);
    assert!(n.iter().any(|x| x.contains("autossh -M")), "{n:#?}");
    assert_eq!(
        p["jump"],
        serde_json::json!(["jump@bastion:2200", "bastion2"])
    );
    assert!(
        n.iter()
            .any(|x| x.contains("jump hosts jump@bastion:2200, bastion2")),
        "{n:#?}"
    );
    assert!(n.iter().any(|x| x.contains("remote command")), "{n:#?}");

    // A line with a bad port: refused, naming the file and the line; nothing written.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.conf");
    std::fs::write(
        &bad,
        "ok|h|u|1|localhost|2|fine\nbroken|h|u|99999|localhost|2|x\n",
    )
    .unwrap();
    let out = dir.path().join("out.toml");
    let o = import(&[bad.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.conf") && err.contains("line 2") && err.contains("99999"),
        "{err}"
    );
    assert!(!out.exists());
}
