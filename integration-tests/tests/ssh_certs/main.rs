//! SSH access that follows the fleet, against a real OpenSSH sshd: an agent with a coordinator
//! makes its own SSH key, the coordinator's SSH user CA certifies it over the control link, and
//! a profile without an identity file logs in with that certificate to an sshd that trusts
//! the CA (`TrustedUserCAKeys`) and lists the agent as a principal whose line opens only its
//! own ports (`permitopen`, `permitlisten`). No key is added to any authorized_keys.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::time::Duration;

use integration_tests::{
    FullCoordinator, Sshd, TestAgent, echo_roundtrip, echo_server, free_port, put_and_assign,
    wait_until,
};
use tunnelfleet_agent::status::ForwardState;
use tunnelfleet_coordinator::sshca::SSH_CA_PUB;

/// A real sshd that trusts the SSH user CA of the fleet in `root/pki` and takes its principals
/// lines from `principals` (written into `root/principals` first).
fn oma_trusting_the_fleet(root: &std::path::Path, principals: &str) -> Sshd {
    let file = root.join("principals");
    std::fs::write(&file, principals).unwrap();
    Sshd::start_with(&format!(
        "TrustedUserCAKeys {}\nAuthorizedPrincipalsFile {}\n",
        root.join("pki").join(SSH_CA_PUB).display(),
        file.display()
    ))
}

/// Profile `oma` to `sshd` with no identity file (the agent's certificate), with `forwards`.
fn certified_profile(sshd: &Sshd, forwards: Vec<String>) -> tunnelfleet_protocol::ProfileSpec {
    let mut spec = tunnelfleet_protocol::ProfileSpec::new("oma", sshd.user.clone(), "unused");
    spec.identity_file = None;
    spec.endpoints = vec![sshd.endpoint()];
    spec.known_hosts = Some(sshd.known_hosts.clone());
    spec.forwards = forwards;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_logs_in_with_its_certificate_and_only_its_ports_open() {
    if !Sshd::available("SSH certificates") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(300), Vec::new()).await;
    let (allowed, _a) = echo_server().await;
    let (other, _o) = echo_server().await;
    let (local, denied_local, remote, denied_remote) =
        (free_port(), free_port(), free_port(), free_port());
    // The OMA: trusts the fleet's SSH CA; the agent's principal line opens its own ports only.
    let sshd = oma_trusting_the_fleet(
        dir.path(),
        &format!(
            "restrict,port-forwarding,permitopen=\"127.0.0.1:{allowed}\",permitlisten=\"127.0.0.1:{remote}\" vma-cert\n"
        ),
    );
    let agent = TestAgent::start(&c.agent_section(dir.path(), "vma-cert", "")).await;
    let spec = certified_profile(
        &sshd,
        vec![
            format!("L {local}:127.0.0.1:{allowed}"),
            format!("L {denied_local}:127.0.0.1:{other}"),
            format!("R 127.0.0.1:{remote}:127.0.0.1:{allowed}"),
            format!("R 127.0.0.1:{denied_remote}:127.0.0.1:{allowed}"),
        ],
    );
    put_and_assign(&c.api, &spec, "vma-cert").await;

    wait_until(30, "data through the certified session", || async {
        echo_roundtrip(local, b"through a certificate")
            .await
            .is_ok()
    })
    .await;
    // The coordinator recorded what it issued; sshd logged the certificate it accepted: the
    // key id and serial tie the session to the agent.
    let issued = c.fleet.store.ssh_cert("vma-cert").unwrap().unwrap();
    let log = sshd.log();
    assert!(
        log.contains(&format!(
            "ED25519-CERT {} ID vma-cert (serial {})",
            issued.key_fingerprint, issued.serial
        )),
        "{log}"
    );
    // The agent's key stayed on the appliance, private.
    let key = dir
        .path()
        .join("vma-cert/state/ssh")
        .join(tunnelfleet_agent::sshcert::KEY_FILE);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // The allowed reverse port is bound by sshd and reaches the agent's side.
    wait_until(20, "the permitted remote forward", || async {
        echo_roundtrip(remote, b"back through it").await.is_ok()
    })
    .await;
    // Outside the principal's line, sshd refuses: a local forward's channel, a remote bind.
    assert!(
        echo_roundtrip(denied_local, b"not mine").await.is_err(),
        "a forward outside permitopen went through"
    );
    wait_until(20, "the refused remote forward says so", || async {
        let p = agent.profile("oma").await;
        p.forwards.iter().any(|f| {
            f.spec.contains(&denied_remote.to_string())
                && f.state == ForwardState::Retrying
                && f.detail.is_some()
        })
    })
    .await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", denied_remote))
            .await
            .is_err(),
        "a remote port outside permitlisten was bound"
    );
    agent.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sshd_that_does_not_list_the_agent_refuses_its_certificate() {
    if !Sshd::available("SSH certificates") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(300), Vec::new()).await;
    let (allowed, _a) = echo_server().await;
    let local = free_port();
    let sshd = oma_trusting_the_fleet(dir.path(), "restrict,port-forwarding someone-else\n");
    let agent = TestAgent::start(&c.agent_section(dir.path(), "vma-unlisted", "")).await;
    let spec = certified_profile(&sshd, vec![format!("L {local}:127.0.0.1:{allowed}")]);
    put_and_assign(&c.api, &spec, "vma-unlisted").await;
    wait_until(30, "the certificate issued", || async {
        c.fleet.store.ssh_cert("vma-unlisted").unwrap().is_some()
    })
    .await;
    wait_until(30, "sshd refusing the unlisted principal", || async {
        let p = agent.profile("oma").await;
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused by the server"))
    })
    .await;
    assert!(echo_roundtrip(local, b"x").await.is_err());
    agent.shutdown().await;
    c.stop().await;
}

/// `tunnelfleet oma sync GROUP` against the coordinator behind `c`, writing into `dir`, ending
/// revoked agents' sessions on `sshd`.
fn oma_sync(
    c: &FullCoordinator,
    root: &std::path::Path,
    dir: &std::path::Path,
    sshd: &Sshd,
) -> String {
    let out = std::process::Command::new(integration_tests::Program::Cli.path())
        .args(["oma", "sync", "oma-dc1", "--dir"])
        .arg(dir)
        .arg("--sshd-log")
        .arg(sshd.log_path())
        .arg("--coordinator")
        .arg(c.admin.to_string())
        .arg("--token-file")
        .arg(root.join("admin.token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "oma sync: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_revoke_and_a_sync_the_oma_refuses_that_agent_and_lets_the_others_in() {
    if !Sshd::available("SSH certificates") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(root.path(), Duration::from_millis(300), Vec::new()).await;
    let (echo, _e) = echo_server().await;
    // The OMA as `oma sshd-config` describes it, its files from a first sync (the revocation
    // file must exist before sshd takes any key).
    let files = root.path().join("oma-files");
    let sshd = Sshd::start_with(&tunnelfleet_ops::cli::oma_sync::sshd_config(
        "oma-dc1", &files,
    ));
    let group = tunnelfleet_coordinator::store::OmaGroup {
        probe: false,
        ..serde_json::from_value(serde_json::json!({
            "name": "oma-dc1", "endpoints": [sshd.endpoint()]
        }))
        .unwrap()
    };
    let _: tunnelfleet_coordinator::admin::Changed = c
        .api
        .call("PUT", "/v1/groups/oma-dc1", Some(&group))
        .await
        .unwrap();
    let mut spec = certified_profile(&sshd, Vec::new());
    spec.group = Some("oma-dc1".into());
    spec.endpoints.clear();
    let mut started = Vec::new();
    for id in ["vma-a", "vma-b"] {
        started.push((
            id,
            TestAgent::start(&c.agent_section(root.path(), id, "")).await,
        ));
    }
    // Both certified before they are given a profile (an agent asks at once), so the
    // onboarding grace must learn the profiles assigned after it began.
    wait_until(30, "both agents certified", || async {
        ["vma-a", "vma-b"]
            .iter()
            .all(|id| c.fleet.store.ssh_cert(id).unwrap().is_some())
    })
    .await;
    let mut agents = Vec::new();
    for (id, agent) in started {
        let port = free_port();
        let mut s = spec.clone();
        s.name = format!("oma-{id}");
        s.forwards = vec![format!("L {port}:127.0.0.1:{echo}")];
        put_and_assign(&c.api, &s, id).await;
        agents.push((id, port, s.name.clone(), agent));
    }
    // Refused by the OMA a few times (it does not list them yet, as before a new appliance's
    // first sync), then synced: the principals file lists both, each with its own port.
    for (id, _, profile, agent) in &agents {
        wait_until(30, &format!("{id} refused four times"), || async {
            agent.profile(profile).await.failures_in_a_row >= 4
        })
        .await;
    }
    oma_sync(&c, root.path(), &files, &sshd);
    let principals = std::fs::read_to_string(files.join("principals")).unwrap();
    for (id, _, _, _) in &agents {
        assert!(
            principals.contains(&format!(
                "permitopen=\"127.0.0.1:{echo}\",permitlisten=\"127.0.0.1:1\" {id}\n"
            )),
            "{principals}"
        );
    }
    for (id, port, _, _) in &agents {
        wait_until(30, &format!("{id}'s tunnel through the OMA"), || async {
            echo_roundtrip(*port, b"in").await.is_ok()
        })
        .await;
    }

    // Revoke vma-a; the next sync takes it out, lists its key as revoked and ends the session
    // it still holds (sshd checks revocation only at login).
    let key = c.fleet.store.ssh_cert("vma-a").unwrap().unwrap().public_key;
    let _: serde_json::Value = c
        .api
        .call(
            "POST",
            "/v1/agents/vma-a/revoke",
            Some(&serde_json::json!({"reason": "stolen"})),
        )
        .await
        .unwrap();
    let said = oma_sync(&c, root.path(), &files, &sshd);
    assert!(said.contains("1 principals, 1 revoked keys"), "{said}");
    assert!(
        said.contains("ended the session of revoked agent vma-a"),
        "{said}"
    );
    assert!(!said.contains("vma-b"), "{said}");
    let revoked = std::fs::read_to_string(files.join("revoked_keys")).unwrap();
    assert!(revoked.contains(key.trim()), "{revoked}");
    assert!(
        !std::fs::read_to_string(files.join("principals"))
            .unwrap()
            .contains("vma-a")
    );

    // vma-a's session is gone and its new login refused by sshd; vma-b's session never blinked.
    let (_, a_port, a_profile, a_agent) = &agents[0];
    wait_until(30, "vma-a refused by the OMA", || async {
        a_agent
            .profile(a_profile)
            .await
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused by the server"))
    })
    .await;
    assert!(echo_roundtrip(*a_port, b"out").await.is_err());
    let (_, b_port, b_profile, b_agent) = &agents[1];
    assert!(echo_roundtrip(*b_port, b"still in").await.is_ok());
    assert_eq!(b_agent.profile(b_profile).await.reconnects, 0);
    // A second sync finds nothing left to end.
    let again = oma_sync(&c, root.path(), &files, &sshd);
    assert!(!again.contains("ended the session"), "{again}");
    // Refused until the first sync listed them, onboarding agents raised no alert.
    let alerts: Vec<tunnelfleet_coordinator::store::Alert> =
        c.api.get("/v1/alerts?all=true").await.unwrap();
    let about_b: Vec<_> = alerts
        .iter()
        .filter(|a| a.subject.starts_with("vma-b"))
        .collect();
    assert!(about_b.is_empty(), "{about_b:?}");
    let log = sshd.log();
    assert!(log.contains("revoked"), "sshd says why: {log}");
    for (_, _, _, agent) in agents {
        agent.shutdown().await;
    }
    c.stop().await;
}

/// Agent `id` with a certified tunnel (`L local` to an echo server) through a real sshd that
/// lists it, on a coordinator whose SSH certificates are valid for the shortest time it takes
/// (renewed about 18 s after issue): the setup of the renewal tests.
struct ShortLived {
    c: FullCoordinator,
    sshd: Sshd,
    agent: TestAgent,
    local: u16,
    first: tunnelfleet_coordinator::store::SshCertRecord,
    _echo: tokio_util::sync::DropGuard,
}

async fn short_lived(dir: &std::path::Path, id: &str) -> ShortLived {
    let c = FullCoordinator::start_with_ssh_validity(
        dir,
        Duration::from_millis(300),
        tunnelfleet_coordinator::sshca::MIN_VALIDITY,
    )
    .await;
    let (echo, guard) = echo_server().await;
    let local = free_port();
    let sshd = oma_trusting_the_fleet(
        dir,
        &format!("restrict,port-forwarding,permitopen=\"127.0.0.1:{echo}\" {id}\n"),
    );
    let agent = TestAgent::start(&c.agent_section(dir, id, "")).await;
    let spec = certified_profile(&sshd, vec![format!("L {local}:127.0.0.1:{echo}")]);
    put_and_assign(&c.api, &spec, id).await;
    wait_until(30, "the certified tunnel", || async {
        echo_roundtrip(local, b"up").await.is_ok()
    })
    .await;
    let first = c.fleet.store.ssh_cert(id).unwrap().unwrap();
    ShortLived {
        c,
        sshd,
        agent,
        local,
        first,
        _echo: guard,
    }
}

mod more;
