//! OTLP trace export of a real `tunnelfleet-coordinator` process to a real HTTP receiver (a
//! minimal OTLP/HTTP collector on loopback): with `OTEL_EXPORTER_OTLP_ENDPOINT` set, admin
//! requests become spans posted to `/v1/traces` as protobuf, under the service's name.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::sync::{Arc, Mutex};

use integration_tests::{CoordinatorProcess, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// (request line, headers in lower case, body) of every request received.
type Posts = Arc<Mutex<Vec<(String, Vec<(String, String)>, Vec<u8>)>>>;

/// The value of header `name` in `headers`.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Accepts HTTP/1.1 requests (over TLS with `tls`) and answers each with an empty 200 (a
/// valid, empty ExportTraceServiceResponse).
async fn collector(tls: Option<tokio_rustls::TlsAcceptor>) -> (u16, Posts) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let posts: Posts = Arc::default();
    let p = posts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (p, tls) = (p.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve_posts(s, p).await,
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(s).await {
                            serve_posts(s, p).await
                        }
                    }
                }
            });
        }
    });
    (port, posts)
}

async fn serve_posts<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: S, p: Posts) {
    let (r, mut w) = tokio::io::split(s);
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len = header(&headers, "content-length").map_or(0, |v| v.parse().unwrap_or(0));
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        p.lock()
            .unwrap()
            .push((line.trim_end().to_string(), headers, body));
        let resp =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if w.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_are_exported_as_spans_over_otlp_http() {
    let (port, posts) = collector(None).await;
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let c = CoordinatorProcess::start_with_env(
        dir.path(),
        "500ms",
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let _: serde_json::Value = c.api.get("/v1/profiles").await.unwrap();
    wait_until(
        20,
        "an OTLP export with the admin request's span",
        || async {
            posts.lock().unwrap().iter().any(|(_, _, body)| {
                contains(body, "admin_request") && contains(body, "/v1/profiles")
            })
        },
    )
    .await;
    let posts = posts.lock().unwrap();
    let (line, headers, body) = posts
        .iter()
        .find(|(_, _, b)| contains(b, "admin_request"))
        .unwrap();
    assert_eq!(line, "POST /v1/traces HTTP/1.1");
    assert_eq!(
        header(headers, "content-type"),
        Some("application/x-protobuf")
    );
    assert!(
        contains(body, "tunnelfleet-coordinator"),
        "service.name in the resource"
    );
    assert!(
        c.log().contains("exporting spans over OTLP/HTTP"),
        "{}",
        c.log()
    );
}

/// Over `https://`: the collector's certificate checked against `OTEL_EXPORTER_OTLP_CERTIFICATE`
/// (and only it), `OTEL_EXPORTER_OTLP_HEADERS` sent with every export and never logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_https_with_the_given_ca_and_headers() {
    let collector_pki = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(collector_pki.path(), &["localhost".into()]).unwrap();
    let tls = integration_tests::tls_acceptor(collector_pki.path()).unwrap();
    let (port, posts) = collector(Some(tls)).await;
    let endpoint = format!("https://localhost:{port}");
    let ca = collector_pki.path().join("ca.pem");
    let secret = "Bearer otlp-secret-4f1b";
    let start = |ca: Option<String>| {
        let endpoint = endpoint.clone();
        async move {
            let dir = tempfile::tempdir().unwrap();
            tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()])
                .unwrap();
            let headers = format!("authorization={},x-tenant=ops", secret.replace(' ', "%20"));
            let mut env = vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_EXPORTER_OTLP_HEADERS", headers),
                ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
            ];
            if let Some(ca) = ca {
                env.push(("OTEL_EXPORTER_OTLP_CERTIFICATE", ca));
            }
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let c = CoordinatorProcess::start_with_env(dir.path(), "500ms", "", &env).await;
            (dir, c)
        }
    };

    // Without the collector's CA (web PKI roots only): the handshake fails, nothing arrives,
    // the coordinator serves on and says why.
    let (_d1, untrusting) = start(None).await;
    let _: serde_json::Value = untrusting.api.get("/v1/profiles").await.unwrap();
    wait_until(
        20,
        "the refused export in the log, with its cause",
        || async {
            let log = untrusting.log();
            log.contains("OTLP span export failed") && log.contains("invalid peer certificate")
        },
    )
    .await;
    drop(untrusting);
    assert!(
        posts.lock().unwrap().is_empty(),
        "exported to an unverified collector"
    );

    let (_d2, c) = start(Some(ca.display().to_string())).await;
    let _: serde_json::Value = c.api.get("/v1/profiles").await.unwrap();
    wait_until(
        20,
        "an OTLP export over https with the admin request's span",
        || async {
            posts
                .lock()
                .unwrap()
                .iter()
                .any(|(_, _, body)| contains(body, "/v1/profiles"))
        },
    )
    .await;
    let posts = posts.lock().unwrap();
    let (line, headers, _) = posts
        .iter()
        .find(|(_, _, b)| contains(b, "/v1/profiles"))
        .unwrap();
    assert_eq!(line, "POST /v1/traces HTTP/1.1");
    assert_eq!(header(headers, "authorization"), Some(secret));
    assert_eq!(header(headers, "x-tenant"), Some("ops"));
    assert!(!c.log().contains("otlp-secret"), "{}", c.log());
}

/// A client key others can read, or a certificate file that is not one: export stays off and
/// the log names the variable; the coordinator runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_otlp_tls_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let key = dir.path().join("client.key");
    std::fs::copy(dir.path().join("pki/coordinator.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let cert = dir.path().join("pki/coordinator.pem");
    let c = CoordinatorProcess::start_with_env(
        dir.path(),
        "500ms",
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://localhost:4318"),
            (
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                cert.to_str().unwrap(),
            ),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key.to_str().unwrap()),
        ],
    )
    .await;
    let log = c.log();
    assert!(
        log.contains("OTLP span export disabled: OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        "{log}"
    );
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "nothing here\n").unwrap();
    let d2 = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&d2.path().join("pki"), &["localhost".into()]).unwrap();
    let c = CoordinatorProcess::start_with_env(
        d2.path(),
        "500ms",
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://localhost:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                not_pem.to_str().unwrap(),
            ),
        ],
    )
    .await;
    let log = c.log();
    assert!(
        log.contains("OTLP span export disabled: OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE:")
            && log.contains("ca.txt"),
        "{log}"
    );
}
