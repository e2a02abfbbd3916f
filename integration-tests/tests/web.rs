//! The fleet page in a real headless Chromium against the real coordinator process: sign in
//! with the admin token (a Secure, HttpOnly, SameSite=Strict cookie), see the agent and the OMA
//! endpoint up, stop the OMA and see the page turn it down and the alert fire, sign out. And
//! over plain HTTP: nothing without a session, a revoked token's session ends.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use fantoccini::Locator;
use integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request to the page; the whole answer as text.
async fn http(port: u16, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn login(port: u16, token: &str) -> String {
    let body = format!("token={token}");
    http(
        port,
        &format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

async fn fleet_with(port: u16, cookie: &str) -> String {
    http(
        port,
        &format!(
            "GET /api/fleet HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await
}

fn session_cookie(answer: &str) -> String {
    answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie in {answer}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_in_chromium_follows_an_oma_going_down() {
    if !Browser::available("web") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let web = free_port();
    let c = CoordinatorProcess::start_with(
        dir.path(),
        "300ms",
        &format!("web_listen = \"127.0.0.1:{web}\"\n"),
    )
    .await;
    // An OMA group whose one endpoint answers like an sshd until the test stops it.
    let endpoint = put_dead_group(&c.api).await;
    let oma =
        serve_ssh_banner_until_dropped(tokio::net::TcpListener::bind(&endpoint).await.unwrap());
    let agent = TestAgent::start(&agent_section(
        c.control,
        dir.path(),
        "vma-1",
        "site = \"dc1\"",
    ))
    .await;
    wait_until(20, "agent connected", || async {
        let a: serde_json::Value = c.api.get("/v1/agents").await.unwrap();
        a[0]["online"] == true
    })
    .await;

    let b = Browser::start().await;
    // Not signed in: the page sends the browser to the sign-in form.
    b.client
        .goto(&format!("http://127.0.0.1:{web}/"))
        .await
        .unwrap();
    let url = b.client.current_url().await.unwrap();
    assert_eq!(url.path(), "/login", "{url}");
    // A wrong token: refused, still on the form.
    b.submit_token("not-the-token").await;
    b.wait_text(10, "#error", "unknown or revoked").await;
    // The right one.
    b.submit_token(ADMIN_TOKEN).await;
    b.wait_text(20, "tr[data-agent=\"vma-1\"]", "online").await;
    // Its SSH certificate, issued over the link for the default 7 days: the time it has left.
    b.wait_text(20, "tr[data-agent=\"vma-1\"]", "6d 23h left")
        .await;
    let row = format!("tr[data-endpoint=\"{endpoint}\"]");
    b.wait_text(20, &row, "up").await;
    let summary = b.wait_text(10, "#summary", "1/1 agents online").await;
    assert!(summary.contains("0 alerts firing"), "{summary}");
    // The one coordinator leads, with its agent; the store is named.
    let c = b.wait_text(10, "tr[data-coordinator]", "leader").await;
    assert!(c.contains("leader") && c.contains(" 1 "), "{c}");
    b.wait_text(10, "#standing", "store sled").await;

    // The session cookie: Secure, HttpOnly, SameSite=Strict.
    let cookies = b.client.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name() == "tf_session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(session.secure(), Some(true));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Strict)");

    // The OMA stops: the page turns its endpoint down and shows the alert, by itself.
    let shot = b.client.screenshot().await.unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    drop(oma);
    b.wait_text(30, &row, "down").await;
    b.wait_text(30, "#firing", "oma_down").await;
    b.wait_text(10, "#summary", "1 alerts firing").await;
    let shot = b.client.screenshot().await.unwrap();
    if let Some(path) = std::env::var_os("TUNNELFLEET_SCREENSHOT") {
        std::fs::write(path, &shot).unwrap();
    }

    // Sign out: back to the form, and the old cookie opens nothing.
    b.client
        .find(Locator::Css("header form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_text(10, "h1", "tunnelfleet").await;
    assert_eq!(b.client.current_url().await.unwrap().path(), "/login");
    let old = format!("tf_session={}", session.value());
    let answer = fleet_with(web, &old).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    b.close().await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_data_needs_a_session_and_a_revoked_token_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let web = free_port();
    let c = CoordinatorProcess::start_with(
        dir.path(),
        "300ms",
        &format!("web_listen = \"127.0.0.1:{web}\"\n"),
    )
    .await;
    // No cookie, a made-up one: 401, and the page itself sends to the form.
    assert!(fleet_with(web, "x=1").await.starts_with("HTTP/1.1 401"));
    assert!(
        fleet_with(web, "tf_session=made-up")
            .await
            .starts_with("HTTP/1.1 401")
    );
    let page = http(
        web,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        page.starts_with("HTTP/1.1 303") && page.contains("location: /login"),
        "{page}"
    );
    assert!(
        page.contains("content-security-policy: default-src 'self'"),
        "{page}"
    );

    // A viewer's named token signs in; revoked, its session ends on the next request.
    let t: serde_json::Value = c
        .api
        .call(
            "POST",
            "/v1/admin-tokens",
            Some(&serde_json::json!({ "name": "wallboard", "role": "viewer" })),
        )
        .await
        .unwrap();
    let answer = login(web, t["token"].as_str().unwrap()).await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    assert!(
        answer.contains("HttpOnly")
            && answer.contains("Secure")
            && answer.contains("SameSite=Strict"),
        "{answer}"
    );
    let cookie = session_cookie(&answer);
    let data = fleet_with(web, &cookie).await;
    assert!(data.starts_with("HTTP/1.1 200"), "{data}");
    assert!(
        data.contains("\"agents\"") && data.contains("\"endpoints\""),
        "{data}"
    );
    let _: serde_json::Value = c
        .api
        .call::<(), _>("DELETE", "/v1/admin-tokens/wallboard", None)
        .await
        .unwrap();
    assert!(fleet_with(web, &cookie).await.starts_with("HTTP/1.1 401"));
}
