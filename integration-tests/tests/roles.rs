//! Named admin tokens with roles, and the audit log, on the real coordinator through the real
//! CLI: a viewer reads and is refused a change, an operator drains but may not touch profiles,
//! a revoked token is refused at once, and every change (refusals of known tokens included)
//! is in the audit log with the token's name, across a kill -9.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration_tests::{CoordinatorProcess, Program};

fn cli(c: &CoordinatorProcess, token_file: &Path, args: &[&str]) -> Output {
    Command::new(Program::Cli.path())
        .args(args)
        .arg("--coordinator")
        .arg(c.admin.to_string())
        .arg("--token-file")
        .arg(token_file)
        .env_remove("TUNNELFLEET_CA_FILE")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `admin-token create NAME --role ROLE` as the file's admin; the secret into a 0600 file.
fn make_token(c: &CoordinatorProcess, dir: &Path, name: &str, role: &str) -> PathBuf {
    let secret = ok(&cli(
        c,
        &c.token_file,
        &["admin-token", "create", name, "--role", role],
    ));
    assert!(secret.starts_with("tfa_"), "{secret}");
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, secret.trim()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_allow_what_they_name_and_the_audit_log_keeps_every_change() {
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let mut c = CoordinatorProcess::start(dir.path(), "500ms").await;
    integration_tests::put_dead_group(&c.api).await;
    let endpoint = c.api.get::<serde_json::Value>("/v1/groups").await.unwrap()[0]["endpoints"][0]
        .as_str()
        .unwrap()
        .to_string();

    let viewer = make_token(&c, dir.path(), "grafana", "viewer");
    let operator = make_token(&c, dir.path(), "alice", "operator");
    // One name, one token.
    let again = refused(&cli(
        &c,
        &c.token_file,
        &["admin-token", "create", "alice", "--role", "admin"],
    ));
    assert!(again.contains("exists already"), "{again}");

    // The viewer reads, and may not change anything.
    ok(&cli(&c, &viewer, &["agents", "list"]));
    ok(&cli(&c, &viewer, &["oma", "list"]));
    let e = refused(&cli(&c, &viewer, &["oma", "drain", &endpoint]));
    assert!(
        e.contains("403") && e.contains("\"grafana\" has role viewer") && e.contains("operator"),
        "{e}"
    );
    // Nor list who holds tokens.
    let e = refused(&cli(&c, &viewer, &["admin-token", "list"]));
    assert!(e.contains("needs admin"), "{e}");

    // The operator drains and undrains, and may not touch profiles or tokens.
    ok(&cli(&c, &operator, &["oma", "drain", &endpoint]));
    ok(&cli(&c, &operator, &["oma", "undrain", &endpoint]));
    let profiles = dir.path().join("p.toml");
    std::fs::write(
        &profiles,
        "[[profile]]\nname = \"x\"\nendpoints = [\"127.0.0.1:22\"]\nuser = \"u\"\nidentity_file = \"/k\"\nknown_hosts = \"/kh\"\nforwards = [\"L 10009:localhost:22\"]\n",
    )
    .unwrap();
    let e = refused(&cli(
        &c,
        &operator,
        &["profiles", "apply", "-f", profiles.to_str().unwrap()],
    ));
    assert!(e.contains("403") && e.contains("needs admin"), "{e}");
    let e = refused(&cli(
        &c,
        &operator,
        &["admin-token", "create", "mallory", "--role", "admin"],
    ));
    assert!(e.contains("needs admin"), "{e}");

    // Listing shows names and roles, never secrets.
    let list = ok(&cli(&c, &c.token_file, &["admin-token", "list"]));
    assert!(
        list.contains("alice") && list.contains("operator"),
        "{list}"
    );
    assert!(!list.contains("tfa_"), "{list}");

    // Revoked: refused from the next request on.
    ok(&cli(&c, &c.token_file, &["admin-token", "revoke", "alice"]));
    let e = refused(&cli(&c, &operator, &["agents", "list"]));
    assert!(e.contains("401"), "{e}");

    // The audit log survives kill -9 and says who did what, and how it ended.
    c.kill9();
    c.restart().await;
    let log = ok(&cli(&c, &viewer, &["audit-log", "--since", "1h", "--json"]));
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(String, String, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["token"].as_str().unwrap().to_string(),
                e["request"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let has = |token: &str, request: &str, status: u64| {
        seen.iter()
            .any(|(t, r, s)| t == token && r.starts_with(request) && *s == status)
    };
    assert!(
        has("admin_token_file", "PUT /v1/groups/oma", 200),
        "{seen:#?}"
    );
    assert!(
        has("admin_token_file", "POST /v1/admin-tokens {", 200),
        "{seen:#?}"
    );
    assert!(
        has("admin_token_file", "POST /v1/admin-tokens", 409),
        "{seen:#?}"
    );
    assert!(has("grafana", "POST /v1/oma/drain", 403), "{seen:#?}");
    assert!(has("alice", "POST /v1/oma/drain", 200), "{seen:#?}");
    assert!(has("alice", "POST /v1/oma/undrain", 200), "{seen:#?}");
    assert!(has("alice", "PUT /v1/profiles/x", 403), "{seen:#?}");
    assert!(
        has("admin_token_file", "DELETE /v1/admin-tokens/alice", 200),
        "{seen:#?}"
    );
    // A viewer's reads are not in it; a read beyond a viewer's (who holds which token) is,
    // refused or not; an unknown token writes nothing.
    assert!(has("grafana", "GET /v1/admin-tokens", 403), "{seen:#?}");
    assert!(
        has("admin_token_file", "GET /v1/admin-tokens", 200),
        "{seen:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|(_, r, _)| r.starts_with("GET ") && !r.starts_with("GET /v1/admin-tokens")),
        "{seen:#?}"
    );
    assert!(!seen.iter().any(|(t, _, _)| t.is_empty()), "{seen:#?}");
    // Refusals carry the reason; no secret is ever in the log.
    let forbidden = entries.iter().find(|e| e["token"] == "grafana").unwrap();
    assert!(
        forbidden["result"]
            .as_str()
            .unwrap()
            .contains("has role viewer"),
        "{forbidden}"
    );
    assert!(!log.contains("tfa_"), "{log}");
    // Each entry is also a log event for shippers.
    assert!(c.log().contains("admin change"), "{}", c.log());
}
