//! Applying pushed profile sets as a diff: start, leave unchanged, replace, report a port
//! conflict by port, refuse bad or clashing profiles, remove.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use integration_tests::free_port;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::supervisor::Supervisor;
use tunnelfleet_protocol::{ProfileSet, ProfileSpec};

fn spec(dir: &Path, name: &str, forwards: &[String]) -> ProfileSpec {
    let key = dir.join("id");
    if !key.exists() {
        let k = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
            .unwrap();
        std::fs::write(&key, k.to_openssh(Default::default()).unwrap().as_bytes()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let text = format!(
        "[[profile]]\nname = \"{name}\"\nendpoints = [\"127.0.0.1:{}\"]\nuser = \"u\"\nidentity_file = \"{}\"\n\
         host_key_fingerprints = [\"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\"]\nforwards = [{}]\n",
        free_port(),
        key.display(),
        forwards
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cfg = AgentConfig::parse(&text, Path::new("t.toml")).unwrap();
    cfg.profiles[0].clone()
}

fn details(a: &tunnelfleet_protocol::Applied) -> Vec<String> {
    a.results
        .iter()
        .map(|r| format!("{} {} {}", r.profile, r.ok, r.detail))
        .collect()
}

#[tokio::test]
async fn a_pushed_set_is_applied_as_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    // Writes the shared identity file as a side effect.
    spec(dir.path(), "x", &["L 1:a:2".into()]);
    let key = dir.path().join("id");
    let local = AgentConfig::parse(
        &format!(
            "[[profile]]\nname = \"local\"\nendpoints = [\"127.0.0.1:1\"]\nuser = \"u\"\nidentity_file = \"{}\"\n\
             host_key_fingerprints = [\"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\"]\nforwards = [\"L {}:a:1\"]\nautostart = false\n",
            key.display(),
            free_port()
        ),
        Path::new("local.toml"),
    )
    .unwrap();
    let mut sup = Supervisor::new(&local).unwrap();
    let (p1, p2) = (free_port(), free_port());
    let a = spec(dir.path(), "oma", &[format!("L {p1}:localhost:8082")]);

    let r = sup
        .apply(&ProfileSet {
            version: 1,
            profiles: vec![a.clone()],
        })
        .await;
    assert!(r.ok, "{:?}", details(&r));
    assert!(
        r.results[0].detail.starts_with("started"),
        "{:?}",
        details(&r)
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p1)).is_ok(),
        "forward listening"
    );

    // A connection held on the forward: its count lives in the running profile, and only an
    // untouched profile keeps it (a replaced one starts from zero).
    let held = std::net::TcpStream::connect(("127.0.0.1", p1)).unwrap();
    // The one just made and the probe above.
    integration_tests::wait_until(5, "both connections counted", || async {
        connections(&sup) >= 2
    })
    .await;
    let before = connections(&sup);
    assert_eq!(before, 2);
    let r = sup
        .apply(&ProfileSet {
            version: 2,
            profiles: vec![a.clone()],
        })
        .await;
    assert_eq!(r.results[0].detail, "unchanged");
    assert_eq!(
        connections(&sup),
        before,
        "an unchanged profile was restarted"
    );
    drop(held);

    let mut changed = a.clone();
    changed.forwards.push(format!("L {p2}:localhost:10809"));
    let r = sup
        .apply(&ProfileSet {
            version: 3,
            profiles: vec![changed.clone()],
        })
        .await;
    assert!(
        r.ok && r.results.iter().all(|x| x.detail.starts_with("replaced")),
        "{:?}",
        details(&r)
    );

    // A port another process holds: reported by port, the rest of the set applied.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = holder.local_addr().unwrap().port();
    let conflict = spec(dir.path(), "conflict", &[format!("L {busy}:localhost:1")]);
    let mut bad = changed.clone();
    bad.name = "broken".into();
    bad.forwards = vec!["L nope".into()];
    let mut clash = changed.clone();
    clash.name = "local".into();
    let r = sup
        .apply(&ProfileSet {
            version: 4,
            profiles: vec![changed.clone(), conflict, bad, clash],
        })
        .await;
    assert!(!r.ok);
    let d = details(&r);
    assert!(
        d.iter().any(|x| x.starts_with("conflict false")
            && x.contains(&format!("port {busy} is already in use"))),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|x| x.starts_with("broken false profile.broken.forwards[0]")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|x| x.starts_with("local false a local profile named \"local\" exists")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .filter(|x| x.starts_with("oma true unchanged"))
            .count()
            == 2,
        "{d:?}"
    );

    // Removing everything pushed stops it; the local profile stays.
    let r = sup
        .apply(&ProfileSet {
            version: 5,
            profiles: vec![],
        })
        .await;
    assert!(r.ok && r.results.is_empty());
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", p1)).is_ok(),
        "removed profile released its port"
    );
    let names: Vec<String> = sup.status().profiles.into_iter().map(|p| p.name).collect();
    assert_eq!(names, vec!["local"]);
    sup.shutdown().await;
}

/// A health check that takes long (here: an HTTP server that accepts and never answers) runs
/// in its own task: the supervisor answers status in the meantime.
#[tokio::test]
async fn status_is_answered_while_a_health_check_is_still_running() {
    use tokio::sync::oneshot;
    use tunnelfleet_agent::supervisor::{Envelope, Request, Response};
    let dir = tempfile::tempdir().unwrap();
    spec(dir.path(), "x", &["L 1:a:2".into()]);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = AgentConfig::parse(
        &format!(
            "[[profile]]\nname = \"oma\"\nendpoints = [\"127.0.0.1:1\"]\nuser = \"u\"\nidentity_file = \"{}\"\n\
             host_key_fingerprints = [\"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\"]\nforwards = [\"L {}:a:1\"]\nautostart = false\n\
             [profile.health]\nhttp = \"http://{}/health\"\ntimeout = \"60s\"\n",
            dir.path().join("id").display(),
            free_port(),
            silent.local_addr().unwrap()
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let mut sup = Supervisor::new(&cfg).unwrap();
    let work = tokio_util::task::TaskTracker::new();
    let (health_tx, mut health_rx) = oneshot::channel();
    sup.serve(
        Envelope::Control(Request::Health { name: "oma".into() }, health_tx),
        &work,
    );
    let (status_tx, mut status_rx) = oneshot::channel();
    sup.serve(Envelope::Control(Request::Status, status_tx), &work);
    assert!(matches!(status_rx.try_recv(), Ok(Response::Status(_))));
    assert!(
        health_rx.try_recv().is_err(),
        "the health check cannot have finished: its server never answers"
    );
    // The server goes away: the check fails and its answer arrives.
    drop(silent);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(30), health_rx)
        .await
        .expect("health answer")
        .unwrap();
    assert!(
        matches!(answer, Response::Health(ref h) if !h.ok),
        "{answer:?}"
    );
    sup.shutdown().await;
}

/// Connections the `oma` profile's first forward has taken since it started.
fn connections(sup: &Supervisor) -> u64 {
    sup.status()
        .profiles
        .iter()
        .find(|p| p.name == "oma")
        .unwrap()
        .forwards[0]
        .connections_total
}
