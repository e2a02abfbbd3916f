//! What the demo waits for and proves through the tunnels.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnelfleet_agent::control;
use tunnelfleet_agent::status::{AgentStatus, ForwardState, ProfileStatus, TunnelState};
use tunnelfleet_agent::supervisor::{Request, Response};
use tunnelfleet_coordinator::admin::Rollout;
use tunnelfleet_coordinator::store::Alert;

use crate::api::ApiClient;
use crate::render;
use tunnelfleet_standins::services::WebhookSink;

use super::setup::*;

/// Waits until every agent has acknowledged `version`; fails on an agent's failed apply.
pub(super) async fn wait_rollout(api: &ApiClient, version: u64) -> anyhow::Result<Rollout> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r: Rollout = api.get("/v1/rollout").await?;
        if let Some((agent, errors)) = r.failed.iter().next() {
            bail!(
                "{agent} could not apply version {}: {}",
                r.version,
                errors.join("; ")
            );
        }
        if r.version >= version && r.pending.is_empty() && r.applied.len() == AGENTS {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("version {version} not acknowledged by every agent within 20s: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the staged rollout in progress to halt.
pub(super) async fn wait_halted(
    api: &ApiClient,
) -> anyhow::Result<tunnelfleet_coordinator::admin::RolloutView> {
    use tunnelfleet_coordinator::store::RolloutState;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Option<tunnelfleet_coordinator::admin::RolloutView> =
            api.get("/v1/rollouts/current").await?;
        match v {
            Some(v) if v.rollout.state == RolloutState::Halted => return Ok(v),
            Some(v) if v.rollout.state != RolloutState::Running => {
                bail!(
                    "the staged rollout ended {:?} instead of halting",
                    v.rollout.state
                )
            }
            _ if Instant::now() > deadline => bail!("the staged rollout did not halt within 30s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits for the webhook delivery of the OMA-down incident in `status` and renders it.
pub(super) async fn wait_webhook(sink: &WebhookSink, status: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = sink.delivered().into_iter().find(|r| {
            let j = r.json();
            j["status"] == status && j["alert"]["kind"] == "oma_down"
        }) {
            let alert: Alert = serde_json::from_value(r.json()["alert"].clone())?;
            return Ok(tunnelfleet_coordinator::hooks::text(&alert));
        }
        if Instant::now() > deadline {
            bail!("no {status} OMA-down alert at the webhook within 20s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn roundtrip(s: &mut TcpStream, payload: &[u8]) -> anyhow::Result<()> {
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
    if back != payload {
        bail!("echo returned other bytes");
    }
    Ok(())
}

pub(super) async fn status(socket: &Path) -> anyhow::Result<AgentStatus> {
    match control::call(socket, &Request::Status).await? {
        Response::Status(s) => Ok(s),
        other => bail!("unexpected answer {other:?}"),
    }
}

pub(super) fn all_active(p: &ProfileStatus) -> bool {
    p.state == TunnelState::Up && p.forwards.iter().all(|f| f.state == ForwardState::Active)
}

pub(super) async fn wait_for(
    socket: &Path,
    secs: u64,
    cond: impl Fn(&ProfileStatus) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = status(socket).await
            && s.profiles.first().is_some_and(&cond)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            let last = status(socket)
                .await
                .map(|s| render::status(&s))
                .unwrap_or_default();
            bail!("not reached within {secs}s; last status:\n{last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "GET 127.0.0.1:{port}{path}: {}",
            head.lines().next().unwrap_or("no response")
        );
    }
    Ok(body.to_string())
}

pub(super) async fn echo(port: u16, n: usize) -> anyhow::Result<()> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 << 10];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            w.write_all(&chunk[..k]).await?;
            left -= k;
        }
        anyhow::Ok(w)
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    while got < n {
        let k = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await??;
        if k == 0 {
            bail!("echo through port {port} ended after {got} of {n} bytes");
        }
        if buf[..k].iter().any(|&b| b != 0x5a) {
            bail!("echo through port {port} returned corrupted data");
        }
        got += k;
    }
    writer.await??;
    Ok(())
}
