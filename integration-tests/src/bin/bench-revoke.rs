//! `bench-revoke`: SSH access that follows the fleet, timed. Real OpenSSH sshd OMAs that trust
//! the fleet's SSH user CA, each kept by `tunnelfleet oma sync` on a 10 s timer of its own
//! (random phase, as systemd timers on separate machines), and real agents (the `dist`
//! binaries) that start with nothing but a join token.
//!
//! - `onboard_s`: from starting an agent with its join token (its profiles assigned to it
//!   beforehand, nobody touching an OMA) to data through its tunnels on every OMA: enrollment,
//!   its SSH key made, its certificate issued, its principal line synced onto each OMA. The
//!   slowest of the agents; `onboard_median_s` beside it.
//! - `revoke_refused_s`: from `POST /v1/agents/ID/revoke` until every OMA refuses a new login
//!   with the revoked agent's key and certificate (OpenSSH's `ssh` tries each OMA every 200 ms).
//! - `revoke_sessions_closed_s`: from the revoke until the revoked agent holds no SSH
//!   connection to any OMA (read off the kernel's TCP table for the agent's process).
//! - `others_disturbed`: the other agents whose tunnels failed a check (an echo through each L
//!   and R forward every 300 ms) or reconnected between the revoke and the end: 0 expected.
//! - The way it was before, in the same run: the revoked agent also holds a session with a
//!   static key in the `authorized_keys` of a fourth sshd; `static_key_session_left` says
//!   whether that session was still carrying data at the end (a revoke cannot reach it).
//!
//! Ends with one JSON line. Needs root (sshd, ending another user's processes). Run:
//! `cargo run --release -p integration-tests --bin bench-revoke [-- --agents N]`.

use integration_tests::SpawnOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use integration_tests::*;
use tunnelfleet_agent::supervisor::{Request, Response};
use tunnelfleet_coordinator::admin::{Changed, TokenCreated};

/// The timer's period, as `tunnelfleet-oma-sync@.timer` ships it.
const SYNC_PERIOD: Duration = Duration::from_secs(10);
/// OMAs of the fleet (one group each; every agent has a tunnel through each).
const OMAS: usize = 3;

/// One OMA: sshd with `oma sshd-config`'s drop-in, the files its sync writes.
struct Oma {
    group: String,
    sshd: Sshd,
    files: PathBuf,
}

/// One appliance: its process, where it keeps its state, its forwards' local and remote ports.
struct Appliance {
    id: String,
    dir: PathBuf,
    process: KillOnDrop,
    /// Per OMA: (L port on the appliance, R port on the OMA).
    ports: Vec<(u16, u16)>,
}

impl Appliance {
    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
}

/// What one run of `oma sync` took and said.
struct SyncRun {
    oma: usize,
    took: Duration,
    ok: bool,
    said: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let [agents] = bench_options([("--agents", 6)])?;
    let agents = usize::try_from(agents)?.max(2);
    if !Sshd::available("bench-revoke") {
        bail!("bench-revoke needs OpenSSH's sshd");
    }
    let agent_bin = dist_binary("tunnelfleet-agent", "tunnelfleet-agent")?;
    let cli_bin = dist_binary("tunnelfleet-ops", "tunnelfleet")?;
    let root = tempfile::tempdir()?;
    let fingerprint =
        tunnelfleet_coordinator::pki::init(&root.path().join("pki"), &["localhost".into()])?;
    let c = BenchCoordinator::start(root.path(), "").await?;
    let (echo, _echo) = echo_server().await;

    // The OMAs, their groups, and the old way's sshd with a static key in authorized_keys.
    let mut omas = Vec::new();
    for k in 0..OMAS {
        let group = format!("oma-dc{k}");
        let files = root.path().join(format!("oma{k}-files"));
        let sshd = Sshd::start_with(&tunnelfleet_ops::cli::oma_sync::sshd_config(&group, &files));
        let body =
            serde_json::json!({"name": group, "endpoints": [sshd.endpoint()], "probe": false});
        let _: Changed = c
            .api
            .call("PUT", &format!("/v1/groups/{group}"), Some(&body))
            .await?;
        omas.push(Oma { group, sshd, files });
    }
    let old_way = Sshd::start();

    // The timers: one loop per OMA, started at a random phase, a run every 10 s.
    let stop = Arc::new(AtomicBool::new(false));
    let runs: Arc<Mutex<Vec<SyncRun>>> = Arc::default();
    let token_file = root.path().join("admin.token");
    let admin = c.api.addr().to_string();
    let mut timers = Vec::new();
    for (k, oma) in omas.iter().enumerate() {
        let args: Vec<String> = vec![
            "oma".into(),
            "sync".into(),
            oma.group.clone(),
            "--dir".into(),
            oma.files.display().to_string(),
            "--sshd-log".into(),
            oma.sshd.log_path().display().to_string(),
            "--coordinator".into(),
            admin.clone(),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        let (cli, stop, runs) = (cli_bin.clone(), stop.clone(), runs.clone());
        let phase = SYNC_PERIOD.mul_f64(rand::random::<f64>());
        timers.push(std::thread::spawn(move || {
            let mut next = Instant::now() + phase;
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let t0 = Instant::now();
                next = t0 + SYNC_PERIOD;
                let out = Command::new(&cli).args(&args).output();
                let (ok, said) = match out {
                    Ok(o) => (
                        o.status.success(),
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        ),
                    ),
                    Err(e) => (false, e.to_string()),
                };
                if let Ok(mut r) = runs.lock() {
                    r.push(SyncRun {
                        oma: k,
                        took: t0.elapsed(),
                        ok,
                        said,
                    });
                }
            }
        }));
    }

    // Onboarding: a token and profiles per appliance, then the agent with nothing else.
    let mut fleet = Vec::new();
    let mut onboard = Vec::new();
    let static_port = free_port();
    let mut started = Vec::new();
    for i in 0..agents {
        let id = format!("vma-{i:03}");
        let dir = root.path().join(&id);
        std::fs::create_dir_all(&dir)?;
        let t: TokenCreated = c
            .api
            .call(
                "POST",
                "/v1/tokens",
                Some(&serde_json::json!({"ttl_s": 600, "agent": id})),
            )
            .await?;
        write_secret(&dir.join("join.token"), t.token.as_bytes());
        let mut ports = Vec::new();
        for oma in &omas {
            let (l, r) = (free_port(), free_port());
            let mut spec = tunnelfleet_protocol::ProfileSpec::new(
                format!("{id}-{}", oma.group),
                oma.sshd.user.clone(),
                "unused",
            );
            spec.identity_file = None;
            spec.group = Some(oma.group.clone());
            spec.known_hosts = Some(oma.sshd.known_hosts.clone());
            spec.forwards = vec![
                format!("L {l}:127.0.0.1:{echo}"),
                format!("R 127.0.0.1:{r}:127.0.0.1:{echo}"),
            ];
            put_and_assign(&c.api, &spec, &id).await;
            ports.push((l, r));
        }
        if i == 0 {
            // The victim also holds a session the old way: a static key in authorized_keys.
            let mut spec = tunnelfleet_protocol::ProfileSpec::new(
                format!("{id}-static"),
                old_way.user.clone(),
                old_way.client_key.display().to_string(),
            );
            spec.endpoints = vec![old_way.endpoint()];
            spec.known_hosts = Some(old_way.known_hosts.clone());
            spec.forwards = vec![format!("L {static_port}:127.0.0.1:{echo}")];
            put_and_assign(&c.api, &spec, &id).await;
        }
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ncontrol_socket = \"{d}/agent.sock\"\n\n[coordinator]\naddress = \"{}\"\nserver_name = \"localhost\"\n\
                 agent_id = \"{id}\"\nca = \"{d}/ca.pem\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\
                 state_dir = \"{d}/state\"\nenroll_token_file = \"{d}/join.token\"\nca_fingerprint = \"{fingerprint}\"\n",
                c.control,
                d = dir.display(),
            ),
        )?;
        let process = KillOnDrop(
            integration_tests::children::owned(&agent_bin)
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "info")
                .stdin(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.join("agent.log"))?)
                .spawn_owned()?,
        );
        started.push(Instant::now());
        fleet.push(Appliance {
            id,
            dir,
            process,
            ports,
        });
    }
    // Every appliance polled together: each one's time is when all its forwards first answered.
    let mut pending: Vec<usize> = (0..fleet.len()).collect();
    let t_start = Instant::now();
    while !pending.is_empty() {
        if t_start.elapsed() > Duration::from_secs(120) {
            let a = &fleet[pending[0]];
            bail!(
                "{}'s tunnels not up within 120 s:\n{}",
                a.id,
                log_tail(&a.dir.join("agent.log"))
            );
        }
        let mut still = Vec::new();
        for i in pending {
            let mut up = true;
            for &(l, r) in &fleet[i].ports {
                up = up && quick_echo(l).await && quick_echo(r).await;
            }
            if up {
                onboard.push(started[i].elapsed().as_secs_f64());
            } else {
                still.push(i);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = &fleet[0];
    let others = &fleet[1..];
    if !quick_echo(static_port).await {
        bail!("the static-key session carries no data");
    }
    let key = victim
        .dir
        .join("state/ssh")
        .join(tunnelfleet_agent::sshcert::KEY_FILE);
    for oma in &omas {
        if !login_refused(&oma.sshd, &key) {
            continue;
        }
        bail!("{} refuses the victim before the revoke", oma.group);
    }
    let oma_ports: Vec<u16> = omas.iter().map(|o| o.sshd.port).collect();
    let held = ssh_connections(victim.process.0.id(), &oma_ports)?;
    if held != OMAS {
        bail!("the victim holds {held} sessions to the OMAs before the revoke, not {OMAS}");
    }
    let reconnects_before = reconnects(others).await?;

    // The others' tunnels checked all along, from just before the revoke to the end.
    let disturbed: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let checking = Arc::new(AtomicBool::new(true));
    let checker = {
        let targets: Vec<(String, Vec<u16>)> = others
            .iter()
            .map(|a| {
                let ports = a.ports.iter().flat_map(|&(l, r)| [l, r]).collect();
                (a.id.clone(), ports)
            })
            .collect();
        let (disturbed, checking) = (disturbed.clone(), checking.clone());
        tokio::spawn(async move {
            while checking.load(Ordering::Relaxed) {
                for (id, ports) in &targets {
                    for &p in ports {
                        if !quick_echo(p).await
                            && let Ok(mut d) = disturbed.lock()
                        {
                            *d.entry(id.clone()).or_default() += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    // The revoke, then (a) every OMA refusing the key and (b) no session left, polled apart.
    let t_revoke = Instant::now();
    let _: serde_json::Value = c
        .api
        .call(
            "POST",
            &format!("/v1/agents/{}/revoke", victim.id),
            Some(&serde_json::json!({"reason": "bench-revoke: appliance stolen"})),
        )
        .await?;
    let pid = victim.process.0.id();
    let closed = tokio::spawn({
        let oma_ports = oma_ports.clone();
        async move {
            tunnelfleet_standins::wait::wait_until(
                60,
                "no session of the revoked agent left",
                || {
                    let oma_ports = oma_ports.clone();
                    async move { ssh_connections(pid, &oma_ports).is_ok_and(|n| n == 0) }
                },
            )
            .await
            .map(|_| t_revoke.elapsed().as_secs_f64())
        }
    });
    // Every OMA probed in each round, until each has refused once.
    let mut refused_s: Vec<Option<f64>> = vec![None; omas.len()];
    while refused_s.iter().any(Option::is_none) {
        if t_revoke.elapsed() > Duration::from_secs(60) {
            bail!("an OMA still takes the revoked key after 60 s: {refused_s:?}");
        }
        for (k, oma) in omas.iter().enumerate() {
            if refused_s[k].is_none() && login_refused(&oma.sshd, &key) {
                refused_s[k] = Some(t_revoke.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused_s: Vec<f64> = refused_s.into_iter().flatten().collect();
    let revoke_refused_s = refused_s.iter().copied().fold(0.0, f64::max);
    let revoke_sessions_closed_s = closed.await??;
    // Stays refused and closed: a while more, the checks still running.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for oma in &omas {
        if !login_refused(&oma.sshd, &key) {
            bail!("{} took the revoked key again", oma.group);
        }
    }
    let left = ssh_connections(pid, &oma_ports)?;
    checking.store(false, Ordering::Relaxed);
    checker.await?;
    let static_key_session_left = quick_echo(static_port).await;
    let reconnects_after = reconnects(others).await?;
    let disturbed = disturbed.lock().map(|d| d.clone()).unwrap_or_default();
    let others_disturbed = others
        .iter()
        .filter(|a| {
            disturbed.contains_key(&a.id)
                || reconnects_after.get(&a.id) != reconnects_before.get(&a.id)
        })
        .count();
    stop.store(true, Ordering::Relaxed);
    for t in timers {
        let _ = t.join();
    }
    let runs: Vec<SyncRun> = runs
        .lock()
        .map(|mut r| r.drain(..).collect())
        .unwrap_or_default();
    let sync_failed: Vec<&SyncRun> = runs.iter().filter(|r| !r.ok).collect();
    if let Some(first) = sync_failed.first() {
        eprintln!("a sync of OMA {} failed: {}", first.oma, first.said.trim());
    }
    let sync_mean_ms =
        runs.iter().map(|r| r.took.as_secs_f64() * 1e3).sum::<f64>() / runs.len().max(1) as f64;
    let ended = runs
        .iter()
        .map(|r| r.said.matches("ended the session of revoked agent").count())
        .sum::<usize>();
    let (sync_runs, sync_failed) = (runs.len(), sync_failed.len());

    onboard.sort_by(f64::total_cmp);
    let onboard_s = onboard.last().copied().unwrap_or_default();
    let onboard_median_s = onboard[onboard.len() / 2];
    println!("bench-revoke on {}", machine());
    println!(
        "{agents} agents (dist builds) enrolled with join tokens, each with a certified tunnel (L and R) through each of {OMAS} OMAs (real sshd on loopback), oma sync every {} s per OMA at a random phase",
        SYNC_PERIOD.as_secs()
    );
    println!(
        "onboard (token to tunnels up on every OMA): slowest {onboard_s:.2} s, median {onboard_median_s:.2} s"
    );
    println!(
        "revoke -> every OMA refuses the key: {revoke_refused_s:.2} s (per OMA: {})",
        refused_s
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "revoke -> no session of it left on any OMA: {revoke_sessions_closed_s:.2} s ({left} left 5 s later)"
    );
    println!(
        "sessions the syncs said they ended: {ended} (the revoked agent's, and any login of the probe caught open); syncs: {sync_runs} runs, {sync_failed} failed, {sync_mean_ms:.0} ms each on average"
    );
    println!(
        "other agents disturbed: {others_disturbed} of {} (failed checks: {disturbed:?})",
        others.len()
    );
    println!(
        "the old way, a static key in authorized_keys: session {} after the revoke",
        if static_key_session_left {
            "still carrying data"
        } else {
            "gone"
        }
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "revoke",
            "agents": agents,
            "omas": OMAS,
            "sync_period_s": SYNC_PERIOD.as_secs(),
            "onboard_s": round2(onboard_s),
            "onboard_median_s": round2(onboard_median_s),
            "revoke_refused_s": round2(revoke_refused_s),
            "revoke_sessions_closed_s": round2(revoke_sessions_closed_s),
            "others_disturbed": others_disturbed,
            "sessions_left": left,
            "static_key_session_left": static_key_session_left,
            "sync_mean_ms": sync_mean_ms.round(),
        })
    );
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Whether `sshd` refuses a new login with `key` and its certificate (`KEY-cert.pub`), by
/// OpenSSH's own client.
fn login_refused(sshd: &Sshd, key: &Path) -> bool {
    let (ok, said) = tokio::task::block_in_place(|| ssh_login(sshd, key));
    !ok && said.contains("Permission denied")
}

/// Established TCP connections process `pid` holds to any of `ports` on loopback.
fn ssh_connections(pid: u32, ports: &[u16]) -> anyhow::Result<usize> {
    let process = procfs::process::Process::new(i32::try_from(pid)?)?;
    let inodes: std::collections::HashSet<u64> = process
        .fd()?
        .flatten()
        .filter_map(|fd| match fd.target {
            procfs::process::FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    Ok(procfs::net::tcp()?
        .into_iter()
        .chain(procfs::net::tcp6()?)
        .filter(|e| {
            e.state == procfs::net::TcpState::Established
                && inodes.contains(&e.inode)
                && ports.contains(&e.remote_address.port())
        })
        .count())
}

/// Each agent's reconnects over all its profiles.
async fn reconnects(agents: &[Appliance]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for a in agents {
        let status = match tunnelfleet_agent::control::call(&a.socket(), &Request::Status).await? {
            Response::Status(s) => s,
            other => bail!("{}: status: {other:?}", a.id),
        };
        out.insert(
            a.id.clone(),
            status.profiles.iter().map(|p| p.reconnects).sum(),
        );
    }
    Ok(out)
}

async fn quick_echo(port: u16) -> bool {
    tokio::time::timeout(Duration::from_millis(800), echo_roundtrip(port, b"revoke"))
        .await
        .is_ok_and(|r| r.is_ok())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
