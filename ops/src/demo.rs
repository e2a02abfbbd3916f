//! `tunnelfleet demo`: the seed's tunnel set, end to end, on any machine with nothing set up.
//!
//! Two embedded OMAs (primary and standby, each an SSH server with an API and an NBD stand-in
//! behind it), a VMA API for the reverse forward, and one agent holding the seed's four forwards
//! on one session. It shows data through every forward, stops the primary, shows the agent on
//! the standby with data flowing again, and cleans up: temp dir removed, every task stopped.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use russh::keys::{Algorithm, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::control::{self, Request, Response};
use tunnelfleet_agent::status::{AgentStatus, ForwardState, ProfileStatus, SessionState};

use crate::oma::{EmbeddedOma, OmaSpec};
use crate::render;
use crate::services::{HttpService, echo_server};

/// What the demo measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Seconds from stopping the primary to data flowing through the standby.
    pub failover_s: f64,
    /// The endpoint the agent ended on.
    pub final_endpoint: String,
    /// Bytes carried through the NBD forward.
    pub nbd_bytes: u64,
}

/// The seed's virtual OMA ports.
const OMA_API: u16 = 8082;
const OMA_NBD: u16 = 10809;

/// Runs the demo, narrating to `out`.
pub async fn run(out: &mut (impl Write + Send)) -> anyhow::Result<DemoReport> {
    let dir = tempfile::Builder::new()
        .prefix("tunnelfleet-demo-")
        .tempdir()
        .context("creating the demo's temp dir")?;
    let result = run_in(dir.path(), out).await;
    drop(dir);
    result
}

async fn run_in(dir: &Path, out: &mut (impl Write + Send)) -> anyhow::Result<DemoReport> {
    say(
        out,
        "tunnelfleet demo: the seed's VMA→OMA tunnel set, with a standby OMA",
    )?;

    // The appliance's key, 0600 as OpenSSH demands.
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .context("generating the VMA key")?;
    let key_path = dir.join("vma_ed25519");
    write_private(&key_path, &key)?;

    // Two OMAs with their own API and NBD services behind them.
    let mut omas = Vec::new();
    let mut keep = Vec::new();
    for name in ["oma-a", "oma-b"] {
        let api = HttpService::start(&format!("{name} api"), 0).await?;
        let (nbd, nbd_guard) = echo_server().await?;
        let services = HashMap::from([
            (OMA_API, SocketAddr::from(([127, 0, 0, 1], api.port))),
            (OMA_NBD, SocketAddr::from(([127, 0, 0, 1], nbd))),
        ]);
        let oma = EmbeddedOma::start(OmaSpec {
            name: name.into(),
            authorized: key.public_key().clone(),
            services,
        })
        .await?;
        keep.push((api, nbd_guard));
        omas.push(oma);
    }
    let (primary, standby) = (&omas[0], &omas[1]);
    say(
        out,
        &format!(
            "  OMA primary  oma-a  ssh 127.0.0.1:{}  host key {}",
            primary.port, primary.fingerprint
        ),
    )?;
    say(
        out,
        &format!(
            "  OMA standby  oma-b  ssh 127.0.0.1:{}  host key {}",
            standby.port, standby.fingerprint
        ),
    )?;
    let vma_api = HttpService::start("vma api", 0).await?;

    // The seed's forwards, on free local ports (8082/10809/10808/9081 may be taken here).
    let [l_api, l_nbd, l_alt, r_vma] = free_ports::<4>()?;
    let forwards = [
        format!("L {l_api}:localhost:{OMA_API}"),
        format!("L {l_nbd}:localhost:{OMA_NBD}"),
        format!("L {l_alt}:localhost:{OMA_NBD}"),
        format!("R {r_vma}:localhost:{}", vma_api.port),
    ];
    let socket = dir.join("agent.sock");
    let config = format!(
        r#"[agent]
control_socket = "{socket}"
drain_timeout = "1s"

[[profile]]
name = "oma"
description = "VMA to OMA: API, NBD, alternate NBD, reverse VMA API"
endpoints = ["127.0.0.1:{p1}", "127.0.0.1:{p2}"]
user = "vma"
identity_file = "{key}"
host_key_fingerprints = ["{f1}", "{f2}"]
forwards = [{fw}]
connect_timeout = "2s"
keepalive_interval = "1s"
keepalive_count = 3
reconnect_min = "100ms"
reconnect_max = "1s"
failover_after = 2

[profile.health]
http = "http://127.0.0.1:{l_api}/health"
interval = "500ms"
timeout = "1s"
threshold = 3
"#,
        socket = socket.display(),
        p1 = primary.port,
        p2 = standby.port,
        key = key_path.display(),
        f1 = primary.fingerprint,
        f2 = standby.fingerprint,
        fw = forwards
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let cfg_path = dir.join("agent.toml");
    std::fs::write(&cfg_path, &config)?;
    say(
        out,
        "\nagent.toml (host keys pinned; nothing is trusted blindly):",
    )?;
    for line in config.lines().skip(4) {
        say(out, &format!("  | {line}"))?;
    }

    let cfg = AgentConfig::load(&cfg_path)?;
    let agent = tunnelfleet_agent::agent::Agent::prepare(&cfg).await?;
    let stop = CancellationToken::new();
    let agent_task = tokio::spawn(agent.run(stop.clone()));

    let result = async {
        let started = Instant::now();
        wait_for(&socket, 20, |p| all_active(p) && p.active_endpoint.ends_with(&primary.port.to_string())).await
            .context("the tunnels did not come up on the primary")?;
        say(out, &format!("\n[1] tunnels up on oma-a in {:.2}s, one SSH session carrying four forwards", started.elapsed().as_secs_f64()))?;
        let nbd_bytes = show_traffic(out, l_api, l_nbd, l_alt, r_vma, "oma-a").await?;
        wait_for(&socket, 10, |p| p.health.as_ref().is_some_and(|h| h.last.as_ref().is_some_and(|r| r.ok))).await
            .context("the health check did not pass through the tunnel")?;
        say(out, "    health check GET /health through the L forward passes")?;
        print_status(out, &socket).await?;

        say(out, "\n[2] stopping the primary OMA (oma-a): every session dropped, port closed")?;
        let t0 = Instant::now();
        primary.stop().await;
        wait_for(&socket, 30, |p| all_active(p) && p.active_endpoint.ends_with(&standby.port.to_string())).await
            .context("the agent did not fail over to the standby")?;
        // Failover counts when data flows, not when the session is up.
        let body = get(l_api, "/health").await?;
        let failover_s = t0.elapsed().as_secs_f64();
        say(out, &format!("    agent moved to the standby and data flows again after {failover_s:.2}s: GET /health -> {body:?}"))?;
        let more = show_traffic(out, l_api, l_nbd, l_alt, r_vma, "oma-b").await?;
        let status = print_status(out, &socket).await?;
        let p = &status.profiles[0];
        if p.failovers != 1 {
            bail!("expected one failover, status says {}", p.failovers);
        }
        Ok(DemoReport {
            failover_s,
            final_endpoint: p.active_endpoint.clone(),
            nbd_bytes: nbd_bytes + more,
        })
    }
    .await;

    stop.cancel();
    let _ = agent_task.await;
    for o in &omas {
        o.stop().await;
    }
    drop(keep);
    let report = result?;
    say(
        out,
        &format!(
            "\ndone: failover to the standby in {:.2}s, {} through the NBD forwards; agent stopped gracefully, temp files removed",
            report.failover_s,
            render::bytes(report.nbd_bytes)
        ),
    )?;
    Ok(report)
}

async fn show_traffic(
    out: &mut (impl Write + Send),
    l_api: u16,
    l_nbd: u16,
    l_alt: u16,
    r_vma: u16,
    oma: &str,
) -> anyhow::Result<u64> {
    let body = get(l_api, "/health").await?;
    if !body.starts_with(oma) {
        bail!("expected the API of {oma}, got {body:?}");
    }
    say(
        out,
        &format!("    L {l_api} -> {oma}:8082   GET /health -> {body:?}"),
    )?;
    let n = 8 << 20;
    let t = Instant::now();
    echo(l_nbd, n).await?;
    say(
        out,
        &format!(
            "    L {l_nbd} -> {oma}:10809  {} echoed through NBD in {:.0} ms",
            render::bytes(n as u64),
            t.elapsed().as_secs_f64() * 1000.0
        ),
    )?;
    echo(l_alt, 64 << 10).await?;
    say(
        out,
        &format!("    L {l_alt} -> {oma}:10809  alternate NBD port echoes"),
    )?;
    let body = get(r_vma, "/health").await?;
    say(
        out,
        &format!("    R {oma}:{r_vma} -> VMA api  reverse GET /health -> {body:?}"),
    )?;
    Ok(2 * n as u64 + 2 * (64 << 10))
}

async fn print_status(out: &mut (impl Write + Send), socket: &Path) -> anyhow::Result<AgentStatus> {
    let status = status(socket).await?;
    say(out, "\n  $ tunnelfleet tunnels status")?;
    for line in render::status(&status).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(status)
}

async fn status(socket: &Path) -> anyhow::Result<AgentStatus> {
    match control::call(socket, &Request::Status).await? {
        Response::Status(s) => Ok(s),
        other => bail!("unexpected answer {other:?}"),
    }
}

fn all_active(p: &ProfileStatus) -> bool {
    p.state == SessionState::Up && p.forwards.iter().all(|f| f.state == ForwardState::Active)
}

async fn wait_for(
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

async fn get(port: u16, path: &str) -> anyhow::Result<String> {
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

async fn echo(port: u16, n: usize) -> anyhow::Result<()> {
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

fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    // Hold all listeners until every port is picked so the N ports differ.
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

fn write_private(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let pem = key.to_openssh(russh::keys::ssh_key::LineEnding::LF)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

fn say(out: &mut impl Write, line: &str) -> std::io::Result<()> {
    writeln!(out, "{line}")?;
    out.flush()
}
