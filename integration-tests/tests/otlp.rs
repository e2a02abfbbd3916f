//! OTLP trace export of a real `tunnelfleet-coordinator` process to a real HTTP receiver (a
//! minimal OTLP/HTTP collector on loopback): with `OTEL_EXPORTER_OTLP_ENDPOINT` set, admin
//! requests become spans posted to `/v1/traces` as protobuf, under the service's name.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::sync::{Arc, Mutex};

use integration_tests::{CoordinatorProcess, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// (request line, content-type, body) of every request received.
type Posts = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// Accepts HTTP/1.1 requests and answers each with an empty 200 (a valid, empty
/// ExportTraceServiceResponse).
async fn collector() -> (u16, Posts) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let posts: Posts = Arc::default();
    let p = posts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let p = p.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut len, mut ctype) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let lower = h.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if let Some(v) = lower.strip_prefix("content-type:") {
                            ctype = v.trim().to_string();
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    p.lock()
                        .unwrap()
                        .push((line.trim_end().to_string(), ctype, body));
                    let resp = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, posts)
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_are_exported_as_spans_over_otlp_http() {
    let (port, posts) = collector().await;
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
    let (line, ctype, body) = posts
        .iter()
        .find(|(_, _, b)| contains(b, "admin_request"))
        .unwrap();
    assert_eq!(line, "POST /v1/traces HTTP/1.1");
    assert_eq!(ctype, "application/x-protobuf");
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
