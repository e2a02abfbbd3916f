//! `bench-soak`: a day of traffic compressed. The agent and OpenSSH `ssh`, through one real
//! sshd, each hold the seed's four forwards (three L, one R) with keys renewed after every
//! 1 MiB or 2 s (`rekey_after_bytes`/`rekey_after`, `-o RekeyLimit="1M 2s"`), while bulk
//! streams in both directions (through an L and through the R) and many short connections (all
//! four) run for `--minutes`. Every byte is checked (SHA-256 of what went in against what came
//! back); a read waiting more than 20 s is a stall; the session must never drop. Then the
//! agent's session is re-established `--cycles` times and its resident memory compared with
//! where it was after the first 50.
//!
//! Run: `cargo run --release -p integration-tests --bin bench-soak [-- --minutes 10 --cycles 1000]`.
//! Ends with one JSON line.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::{Sshd, echo_server, free_port, machine, spawn_agent, spawn_ssh, status_kb};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnelfleet_agent::supervisor::command::{Request, Response};

/// A read or connect waiting longer than this is a stall.
const STALL: Duration = Duration::from_secs(20);
/// Bytes per bulk connection (each way).
const BULK: usize = 32 << 20;
/// Bytes per short connection.
const SHORT: usize = 4 << 10;

/// What one contender's traffic came to.
#[derive(Default)]
struct Tally {
    bytes: AtomicU64,
    short: AtomicU64,
    errors: AtomicU64,
    max_wait_ms: AtomicU64,
}

impl Tally {
    fn waited(&self, d: Duration) {
        self.max_wait_ms
            .fetch_max(d.as_millis() as u64, Ordering::Relaxed);
    }
    fn error(&self, what: &str, e: &anyhow::Error) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        if n < 5 {
            eprintln!("    {what}: {e:#}");
        }
    }
}

/// Deterministic bytes for stream `seed` (xorshift).
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let b = state.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

async fn within<T>(
    what: &str,
    tally: &Tally,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let r = tokio::time::timeout(STALL, f).await;
    tally.waited(start.elapsed());
    match r {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("stalled: {what} waited more than {STALL:?}"),
    }
}

/// One connection through `port` to an echo server: `n` bytes out, `n` back, both hashed.
async fn echo_checked(port: u16, n: usize, seed: u64, tally: &Tally) -> anyhow::Result<()> {
    let s = within("connect", tally, TcpStream::connect(("127.0.0.1", port))).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    let writer = async {
        let mut sent = Sha256::new();
        let mut state = seed | 1;
        let mut buf = vec![0u8; 64 << 10];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len());
            fill(&mut buf[..k], &mut state);
            sent.update(&buf[..k]);
            w.write_all(&buf[..k]).await?;
            left -= k;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(sent.finalize())
    };
    let reader = async {
        let mut got = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0usize;
        while total < n {
            let k = within("read", tally, r.read(&mut buf)).await?;
            if k == 0 {
                bail!("closed after {total} of {n} bytes");
            }
            got.update(&buf[..k]);
            total += k;
        }
        Ok(got.finalize())
    };
    let (sent, got) = tokio::join!(writer, reader);
    let (sent, got) = (sent.context("write")?, got?);
    if sent != got {
        bail!("checksum mismatch over {n} bytes");
    }
    tally.bytes.fetch_add(2 * n as u64, Ordering::Relaxed);
    Ok(())
}

/// Bulk streams through `port` until `until`.
async fn bulk(port: u16, until: Instant, tally: Arc<Tally>, seed: u64) {
    let mut i = seed;
    while Instant::now() < until {
        i += 1;
        if let Err(e) = echo_checked(port, BULK, i, &tally).await {
            tally.error("bulk", &e);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Short connections through each of `ports` in turn until `until`.
async fn short(ports: [u16; 4], until: Instant, tally: Arc<Tally>, seed: u64) {
    let mut i = seed;
    while Instant::now() < until {
        for p in ports {
            i += 1;
            match echo_checked(p, SHORT, i, &tally).await {
                Ok(()) => {
                    tally.short.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tally.error("short", &e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Runs a contender's traffic on its four ports until `until`.
fn traffic(
    ports: [u16; 4],
    until: Instant,
    seed: u64,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let tasks = vec![
        tokio::spawn(bulk(ports[0], until, tally.clone(), seed)),
        tokio::spawn(bulk(ports[3], until, tally.clone(), seed + (1 << 40))),
        tokio::spawn(short(ports, until, tally.clone(), seed + (2 << 40))),
        tokio::spawn(short(ports, until, tally.clone(), seed + (3 << 40))),
    ];
    (tally, tasks)
}

fn forwards(ports: [u16; 4], echo: u16, appliance: u16) -> [(char, u16, u16); 4] {
    [
        ('L', ports[0], echo),
        ('L', ports[1], echo),
        ('L', ports[2], echo),
        ('R', ports[3], appliance),
    ]
}

/// The forwards as the agent writes them, and as ssh's flags.
fn agent_forwards(fw: &[(char, u16, u16)]) -> Vec<String> {
    fw.iter()
        .map(|(k, p, t)| format!("{k} {p}:127.0.0.1:{t}"))
        .collect()
}

fn ssh_forwards(fw: &[(char, u16, u16)]) -> Vec<String> {
    fw.iter()
        .map(|(k, p, t)| format!("-{k}{p}:127.0.0.1:{t}"))
        .collect()
}

/// Waits until each port carries an echo.
async fn wait_ready(ports: [u16; 4]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let t = Tally::default();
    for p in ports {
        while echo_checked(p, 1024, 7, &t).await.is_err() {
            if Instant::now() > deadline {
                bail!("port {p} did not carry data within 30s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

fn count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

async fn profile(socket: &Path) -> anyhow::Result<tunnelfleet_agent::status::ProfileStatus> {
    match tunnelfleet_agent::control::call(socket, &Request::Status).await? {
        Response::Status(s) => s
            .profiles
            .into_iter()
            .next()
            .context("no profile in the status"),
        other => bail!("status: {other:?}"),
    }
}

/// Restarts the session and waits until the new one carries data.
async fn cycle(socket: &Path, port: u16, before: u64) -> anyhow::Result<u64> {
    match tunnelfleet_agent::control::call(
        socket,
        &Request::Restart {
            name: "soak".into(),
        },
    )
    .await?
    {
        Response::Ok { .. } => {}
        other => bail!("restart: {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = profile(socket).await?;
        if p.reconnects > before && p.state == tunnelfleet_agent::status::TunnelState::Up {
            let t = Tally::default();
            if echo_checked(port, 1024, 9, &t).await.is_ok() {
                return Ok(p.reconnects);
            }
        }
        if Instant::now() > deadline {
            bail!("no new session within 30s of a restart");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let [minutes, cycles] =
        integration_tests::bench_options([("--minutes", 10), ("--cycles", 1000)])?;
    let cycles = cycles as usize;
    if !Sshd::available("bench-soak") {
        bail!("bench-soak needs /usr/sbin/sshd");
    }
    let agent_bin = integration_tests::dist_binary("tunnelfleet-agent", "tunnelfleet-agent")?;
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let (appliance, _a) = echo_server().await;
    let dir = tempfile::tempdir()?;
    let a_ports = [free_port(), free_port(), free_port(), free_port()];
    let s_ports = [free_port(), free_port(), free_port(), free_port()];
    let agent = spawn_agent(
        &agent_bin,
        dir.path(),
        &sshd,
        "soak",
        &agent_forwards(&forwards(a_ports, echo, appliance)),
        "rekey_after_bytes = 1048576\nrekey_after = \"2s\"",
        "warn,russh::client::kex=debug",
    )?;
    let mut ssh = spawn_ssh(
        &sshd,
        &[
            "-v",
            "-o",
            "RekeyLimit=1M 2s",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
        ],
        &ssh_forwards(&forwards(s_ports, echo, appliance)),
        Some(&dir.path().join("ssh.log")),
    )?;
    if let Err(e) = wait_ready(a_ports).await {
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        bail!("the agent's forwards: {e:#}\n{log}");
    }
    if let Err(e) = wait_ready(s_ports).await {
        let log = std::fs::read_to_string(dir.path().join("ssh.log")).unwrap_or_default();
        bail!("ssh's forwards: {e:#}\n{log}");
    }
    let socket = dir.path().join("agent.sock");
    let first = profile(&socket).await?;
    eprintln!(
        "bench-soak: {} min, keys renewed every 1 MiB or 2 s, agent and ssh side by side",
        minutes
    );

    let until = Instant::now() + Duration::from_secs(minutes * 60);
    let (a, a_tasks) = traffic(a_ports, until, 1);
    let (s, s_tasks) = traffic(s_ports, until, 1 << 50);
    let started = Instant::now();
    let mut next_report = started + Duration::from_secs(60);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            eprintln!(
                "  {:>3} s: agent {} MiB, {} short, {} errors; ssh {} MiB, {} short, {} errors",
                started.elapsed().as_secs(),
                a.bytes.load(Ordering::Relaxed) >> 20,
                a.short.load(Ordering::Relaxed),
                a.errors.load(Ordering::Relaxed),
                s.bytes.load(Ordering::Relaxed) >> 20,
                s.short.load(Ordering::Relaxed),
                s.errors.load(Ordering::Relaxed),
            );
        }
    }
    for t in a_tasks.into_iter().chain(s_tasks) {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let last = profile(&socket).await?;
    let agent_dropped =
        last.reconnects != first.reconnects || last.up_since_unix_ms != first.up_since_unix_ms;
    let ssh_dropped = ssh.0.try_wait()?.is_some();
    let agent_rekeys =
        count(&dir.path().join("agent.log"), "negotiated algorithms").saturating_sub(1);
    let ssh_rekeys =
        count(&dir.path().join("ssh.log"), "SSH2_MSG_KEXINIT received").saturating_sub(1);
    let gbps = |t: &Tally| t.bytes.load(Ordering::Relaxed) as f64 * 8.0 / secs / 1e9;
    let report = |who: &str, t: &Tally, rekeys: usize, dropped: bool| {
        eprintln!(
            "  {who:<6} {:.0} MiB checked ({:.3} Gbit/s), {} short connections, {rekeys} key renewals, {} errors, longest wait {} ms, session dropped: {dropped}",
            t.bytes.load(Ordering::Relaxed) as f64 / 1048576.0,
            gbps(t),
            t.short.load(Ordering::Relaxed),
            t.errors.load(Ordering::Relaxed),
            t.max_wait_ms.load(Ordering::Relaxed)
        )
    };
    report("agent:", &a, agent_rekeys, agent_dropped);
    report("ssh:", &s, ssh_rekeys, ssh_dropped);
    drop(ssh);

    // Reconnect cycles: memory after the first 50, then after all of them.
    let pid = agent.0.id();
    let mut reconnects = last.reconnects;
    let warm = 50.min(cycles);
    let cycles_started = Instant::now();
    for _ in 0..warm {
        reconnects = cycle(&socket, a_ports[0], reconnects).await?;
    }
    let rss_start = status_kb(pid, "VmRSS")?;
    for i in warm..cycles {
        reconnects = cycle(&socket, a_ports[0], reconnects).await?;
        if (i + 1) % 250 == 0 {
            eprintln!(
                "  {} reconnect cycles, RSS {} kB",
                i + 1,
                status_kb(pid, "VmRSS")?
            );
        }
    }
    let rss_end = status_kb(pid, "VmRSS")?;
    let growth = rss_end as i64 - rss_start as i64;
    eprintln!(
        "  {} reconnect cycles in {:.1} s: agent RSS {rss_start} kB after {warm}, {rss_end} kB after all ({growth:+} kB)",
        cycles,
        cycles_started.elapsed().as_secs_f64()
    );
    let ratio = gbps(&a) / gbps(&s).max(1e-9);
    eprintln!(
        "  agent / ssh throughput under the same rekeying = {ratio:.2}x; machine: {}",
        machine()
    );
    println!(
        "{{\"minutes\":{},\"agent_checked_mib\":{},\"ssh_checked_mib\":{},\"agent_gbps\":{:.3},\"ssh_gbps\":{:.3},\"ratio_vs_openssh\":{ratio:.3},\"agent_short_connections\":{},\"ssh_short_connections\":{},\"agent_rekeys\":{agent_rekeys},\"ssh_rekeys\":{ssh_rekeys},\"agent_errors\":{},\"ssh_errors\":{},\"agent_longest_wait_ms\":{},\"ssh_longest_wait_ms\":{},\"agent_session_dropped\":{agent_dropped},\"ssh_session_dropped\":{ssh_dropped},\"reconnect_cycles\":{},\"agent_rss_kb_after_warmup\":{rss_start},\"agent_rss_kb_after_cycles\":{rss_end},\"agent_rss_growth_kb\":{growth}}}",
        minutes,
        a.bytes.load(Ordering::Relaxed) >> 20,
        s.bytes.load(Ordering::Relaxed) >> 20,
        gbps(&a),
        gbps(&s),
        a.short.load(Ordering::Relaxed),
        s.short.load(Ordering::Relaxed),
        a.errors.load(Ordering::Relaxed),
        s.errors.load(Ordering::Relaxed),
        a.max_wait_ms.load(Ordering::Relaxed),
        s.max_wait_ms.load(Ordering::Relaxed),
        cycles,
    );
    let failed = a.errors.load(Ordering::Relaxed) > 0 || agent_dropped || growth > 1024;
    if failed {
        bail!("the agent lost data, dropped its session, or grew by more than 1 MB");
    }
    Ok(())
}
