//! The email hook against an SMTP receiver: an OMA-down incident and its resolution arrive as
//! two messages over STARTTLS (the relay's certificate checked against `ca_file`) with the
//! configured login; a relay answering 451 keeps the message in the durable outbox until it
//! takes it; an `smtps://` relay gets it over TLS from the first byte; a relay that offers no
//! STARTTLS gets neither the message nor the login; unsafe settings are refused naming the hook
//! and the key.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::sync::atomic::Ordering;

use integration_tests::smtp::SmtpSink;
use integration_tests::{
    CoordinatorProcess, free_port, put_probed_group, serve_ssh_banner, wait_until, write_secret,
};
use tunnelfleet_coordinator::hooks::{Hook, HookConfig, HookKind};
use tunnelfleet_coordinator::pki;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_and_its_resolution_arrive_by_email_over_starttls() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    // The relay's own CA, as a company mail relay would have.
    let relay_pki = dir.path().join("relay-pki");
    pki::init(&relay_pki, &["localhost".into()]).unwrap();
    let sink = SmtpSink::start(Some(&relay_pki)).await.unwrap();
    let password = dir.path().join("smtp.password");
    write_secret(&password, b"s3cret-relay-password\n");
    let hook = format!(
        "[[hook]]\nname = \"mail\"\nkind = \"email\"\nurl = \"smtp://localhost:{}\"\nfrom = \"tunnelfleet <tunnelfleet@example.com>\"\nto = [\"oncall@example.com\", \"ops@example.com\"]\nusername = \"alerts\"\npassword_file = \"{}\"\nca_file = \"{}\"\ntimeout = \"5s\"\n",
        sink.port,
        password.display(),
        relay_pki.join("ca.pem").display()
    );
    let c = CoordinatorProcess::start_with(dir.path(), "500ms", &hook).await;

    // A group whose primary is down (nothing listens) and whose standby answers like an sshd.
    let dead_port = free_port();
    let dead = format!("127.0.0.1:{dead_port}");
    put_probed_group(&c.api, &dead).await;

    wait_until(30, "the OMA-down incident by email", || async {
        !sink.mails().is_empty()
    })
    .await;
    let firing = &sink.mails()[0];
    assert!(firing.tls, "sent before STARTTLS");
    assert_eq!(
        firing.login,
        Some(("alerts".into(), "s3cret-relay-password".into()))
    );
    assert_eq!(firing.from, "tunnelfleet@example.com");
    assert_eq!(firing.to, ["oncall@example.com", "ops@example.com"]);
    assert!(
        firing
            .data
            .contains("Subject: [tunnelfleet] FIRING oma_down:"),
        "{}",
        firing.data
    );
    assert!(firing.data.contains(&dead), "{}", firing.data);
    let id_line = firing
        .data
        .lines()
        .find(|l| l.starts_with("Idempotency key: "))
        .unwrap()
        .trim_start_matches("Idempotency key: ")
        .to_string();
    assert!(
        firing
            .data
            .contains(&format!("Message-ID: <{id_line}@tunnelfleet>")),
        "{}",
        firing.data
    );
    assert!(
        !c.log().contains("s3cret-relay-password"),
        "the SMTP password was logged"
    );

    // The relay refuses for a while: the resolution waits in the outbox and is retried.
    sink.failing.store(true, Ordering::Relaxed);
    serve_ssh_banner(
        tokio::net::TcpListener::bind(("127.0.0.1", dead_port))
            .await
            .unwrap(),
    );
    // The resolution refused by the relay and kept.
    c.wait_hook_backlog("451").await;
    assert_eq!(sink.mails().len(), 1);
    sink.failing.store(false, Ordering::Relaxed);
    wait_until(30, "the resolution delivered on retry", || async {
        sink.mails().len() == 2
    })
    .await;
    let resolved = &sink.mails()[1];
    assert!(
        resolved
            .data
            .contains("Subject: [tunnelfleet] RESOLVED oma_down:"),
        "{}",
        resolved.data
    );
    let h: serde_json::Value = c.api.get("/v1/hooks").await.unwrap();
    assert_eq!(h[0]["pending"], 0);
    assert_eq!(h[0]["kind"], "email");
}

/// An email hook on `url` with a login and the relay's CA, as coordinator.toml would have it.
fn mail_hook(dir: &std::path::Path, url: &str, relay_pki: &std::path::Path) -> String {
    let password = dir.join("smtp.password");
    write_secret(&password, b"s3cret-relay-password\n");
    format!(
        "[[hook]]\nname = \"mail\"\nkind = \"email\"\nurl = \"{url}\"\nfrom = \"tunnelfleet@example.com\"\nto = [\"oncall@example.com\"]\nusername = \"alerts\"\npassword_file = \"{}\"\nca_file = \"{}\"\ntimeout = \"5s\"\n",
        password.display(),
        relay_pki.join("ca.pem").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtps_relay_gets_the_incident_over_tls_from_the_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let relay_pki = dir.path().join("relay-pki");
    pki::init(&relay_pki, &["localhost".into()]).unwrap();
    let sink = SmtpSink::start_smtps(&relay_pki).await.unwrap();
    let url = format!("smtps://localhost:{}", sink.port);
    let c = CoordinatorProcess::start_with(
        dir.path(),
        "500ms",
        &mail_hook(dir.path(), &url, &relay_pki),
    )
    .await;
    let dead = format!("127.0.0.1:{}", free_port());
    put_probed_group(&c.api, &dead).await;
    wait_until(30, "the OMA-down incident over smtps", || async {
        !sink.mails().is_empty()
    })
    .await;
    let m = &sink.mails()[0];
    assert!(m.tls);
    assert_eq!(
        m.login,
        Some(("alerts".into(), "s3cret-relay-password".into()))
    );
    assert!(
        m.data.contains("Subject: [tunnelfleet] FIRING oma_down:") && m.data.contains(&dead),
        "{}",
        m.data
    );
    // TLS from the first byte: no command ever arrived in the clear, STARTTLS was not needed.
    let verbs = sink.verbs();
    assert!(verbs.iter().all(|(_, tls)| *tls), "{verbs:?}");
    assert!(!verbs.iter().any(|(v, _)| v == "STARTTLS"), "{verbs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_offers_no_starttls_gets_neither_the_message_nor_the_login() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let relay_pki = dir.path().join("relay-pki");
    pki::init(&relay_pki, &["localhost".into()]).unwrap();
    // A relay (or someone in the path stripping the offer) without STARTTLS.
    let sink = SmtpSink::start(None).await.unwrap();
    let url = format!("smtp://localhost:{}", sink.port);
    let c = CoordinatorProcess::start_with(
        dir.path(),
        "500ms",
        &mail_hook(dir.path(), &url, &relay_pki),
    )
    .await;
    put_probed_group(&c.api, &format!("127.0.0.1:{}", free_port())).await;
    // The delivery is refused by the coordinator itself and kept for a later attempt.
    c.wait_hook_backlog("STARTTLS").await;
    let h: serde_json::Value = c.api.get("/v1/hooks").await.unwrap();
    assert_eq!(h[0]["delivered"], 0, "{h}");
    assert!(sink.mails().is_empty());
    let verbs = sink.verbs();
    assert!(
        verbs.iter().any(|(v, _)| v == "EHLO"),
        "the relay was never asked: {verbs:?}"
    );
    for never in ["AUTH", "MAIL", "RCPT", "DATA"] {
        assert!(
            !verbs.iter().any(|(v, _)| v == never),
            "{never} sent to a relay without TLS: {verbs:?}"
        );
    }
}

#[test]
fn unsafe_or_incomplete_email_hooks_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let loose = dir.path().join("loose.password");
    std::fs::write(&loose, "pw").unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let base = || {
        let mut h = HookConfig::webhook("mail", String::new(), dir.path().join("x"));
        h.kind = HookKind::Email;
        h.secret_file = None;
        h.url = Some("smtp://mail.example.com".into());
        h.from = Some("tunnelfleet@example.com".into());
        h.to = vec!["oncall@example.com".into()];
        h
    };
    Hook::from_config(&base()).unwrap();
    type Change<'a> = Box<dyn Fn(&mut HookConfig) + 'a>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|h| h.url = Some("smtp://mail.example.com?tls=none".into())),
            "url",
        ),
        (
            Box::new(|h| h.url = Some("smtp://u:p@mail.example.com".into())),
            "url",
        ),
        (Box::new(|h| h.to.clear()), "to"),
        (Box::new(|h| h.from = Some("not an address".into())), "from"),
        (
            Box::new(|h| h.username = Some("alerts".into())),
            "password_file",
        ),
        (
            Box::new(|h| {
                h.username = Some("alerts".into());
                h.password_file = Some(loose.clone());
            }),
            "password_file",
        ),
        (
            Box::new(|h| h.ca_file = Some(dir.path().join("missing.pem"))),
            "ca_file",
        ),
    ];
    for (change, key) in cases {
        let mut h = base();
        change(&mut h);
        let err = Hook::from_config(&h).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("hook \"mail\": {key}:")),
            "{key}: {err}"
        );
    }
    // A relay on this host may be plaintext.
    let mut local = base();
    local.url = Some("smtp://127.0.0.1:25?tls=none".into());
    Hook::from_config(&local).unwrap();
}
