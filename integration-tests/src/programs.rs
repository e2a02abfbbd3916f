//! The workspace's programs as tests run them: the test build's `test-*` binaries, and the
//! `dist` builds the benchmarks measure.

use crate::children::SpawnOwned;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One of the workspace's programs, as the test build compiled it: integration-tests' own
/// `test-*` binaries, each a one-line `main` over the program's `cli` module. Cargo builds them
/// with the integration tests, with the same features, so they are never stale and never cost a
/// second compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `tunnelfleet-agent`.
    Agent,
    /// `tunnelfleet-coordinator`.
    Coordinator,
    /// `tunnelfleet`, the operator CLI.
    Cli,
    /// The store's writer for its kill -9 test.
    StoreWriter,
}

impl Program {
    /// The binary's path, next to the running test's own executable.
    ///
    /// # Panics
    /// When the binary is missing: the test was not started by `cargo test`.
    pub fn path(self) -> PathBuf {
        let name = match self {
            Program::Agent => "test-agent",
            Program::Coordinator => "test-coordinator",
            Program::Cli => "test-tunnelfleet",
            Program::StoreWriter => "test-store-writer",
        };
        let exe = std::env::current_exe().expect("current exe");
        // Tests run from target/<profile>/deps/, binaries live in target/<profile>/.
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let path = dir.join(name);
        assert!(
            path.exists(),
            "{} is missing: run the tests through cargo test, which builds it",
            path.display()
        );
        path
    }
}

/// A program of this workspace as it ships (the `dist` profile), built first: what the
/// benchmarks measure. The harness itself runs from `target/release`.
pub fn dist_binary(package: &str, bin: &str) -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/<bench> -> target/dist/<bin>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("dist").join(bin))
        .ok_or_else(|| std::io::Error::other("no target dir"))?;
    eprintln!("building {bin} with the dist profile (fat LTO: a few minutes the first time)");
    let mut build = Command::new(env!("CARGO"));
    build.args([
        "build",
        "--profile",
        "dist",
        "-q",
        "-p",
        package,
        "--bin",
        bin,
    ]);
    let status = build.status()?;
    if !status.success() || !path.exists() {
        return Err(std::io::Error::other(format!(
            "could not build {}",
            path.display()
        )));
    }
    Ok(path)
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `kB` field of `/proc/<pid>/status`: `VmRSS` (resident now), `VmHWM` (its peak).
pub fn status_kb(pid: u32, field: &str) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// This machine's CPU model and count, for a benchmark's report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string))
        })
        .unwrap_or_default();
    format!(
        "{cpu}, {} cpus",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

/// A benchmark's numeric `--name value` options: each of `known` (name, default) in order.
pub fn bench_options<const N: usize>(known: [(&str, u64); N]) -> anyhow::Result<[u64; N]> {
    use anyhow::Context;
    let mut values = known.map(|(_, default)| default);
    let usage: Vec<String> = known.iter().map(|(k, _)| format!("{k} N")).collect();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let Some(i) = known.iter().position(|(name, _)| *name == k) else {
            anyhow::bail!("unknown argument {k} (use {})", usage.join(", "));
        };
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        values[i] = v
            .parse()
            .with_context(|| format!("{k}: {v:?} is not a number"))?;
    }
    Ok(values)
}

/// `ssh -N` through `sshd` with its key and known_hosts (host key checked, forwards must bind),
/// `options` (`-o …`, `-c …`) and `forwards` (`-L…`, `-R…`) added: the OpenSSH client the
/// benchmarks compare with. Its stderr goes to `log` when given.
pub fn spawn_ssh(
    sshd: &crate::Sshd,
    options: &[&str],
    forwards: &[String],
    log: Option<&Path>,
) -> std::io::Result<KillOnDrop> {
    let mut cmd = crate::children::owned("ssh");
    cmd.args([
        "-N",
        "-T",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
    ])
    .args(["-o", "ExitOnForwardFailure=yes", "-o"])
    .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
    .arg("-i")
    .arg(&sshd.client_key)
    .args(["-p", &sshd.port.to_string()])
    .args(options)
    .args(forwards)
    .arg(format!("{}@127.0.0.1", sshd.user))
    .stdin(std::process::Stdio::null());
    if let Some(log) = log {
        cmd.stderr(std::fs::File::create(log)?);
    }
    Ok(KillOnDrop(cmd.spawn_owned()?))
}

/// The agent binary `bin` with one profile `name` on `sshd` carrying `forwards`, its defaults
/// otherwise (what ships, unlike [`crate::profile_toml`]'s short test timings); `agent` adds lines
/// to its `[agent]` section. Config and control socket (`agent.sock`) in `dir`; logs to
/// `dir/agent.log` with `RUST_LOG=rust_log`.
pub fn spawn_agent(
    bin: &Path,
    dir: &Path,
    sshd: &crate::Sshd,
    name: &str,
    forwards: &[String],
    agent: &str,
    rust_log: &str,
) -> std::io::Result<KillOnDrop> {
    let fw: Vec<String> = forwards.iter().map(|f| format!("{f:?}")).collect();
    let cfg = format!(
        "[agent]\ncontrol_socket = \"{}/agent.sock\"\n{agent}\n[[profile]]\nname = \"{name}\"\nendpoints = [\"{}\"]\n\
         user = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\nforwards = [{}]\n",
        dir.display(),
        sshd.endpoint(),
        sshd.user,
        sshd.client_key.display(),
        sshd.known_hosts.display(),
        fw.join(", ")
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg)?;
    let child = crate::children::owned(bin)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", rust_log)
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn_owned()?;
    Ok(KillOnDrop(child))
}

/// One fleet PKI for several coordinators: made in `dirs[0]/pki`, copied (modes kept) into
/// each other `dir/pki`, where [`BenchCoordinator::start_binary`] finds it.
pub fn share_pki(dirs: &[PathBuf]) -> anyhow::Result<()> {
    let Some(first) = dirs.first() else {
        return Ok(());
    };
    tunnelfleet_coordinator::pki::init(&first.join("pki"), &["localhost".into()])?;
    for d in &dirs[1..] {
        std::fs::create_dir_all(d.join("pki"))?;
        for f in std::fs::read_dir(first.join("pki"))? {
            let f = f?;
            let to = d.join("pki").join(f.file_name());
            std::fs::copy(f.path(), &to)?;
            std::fs::set_permissions(&to, std::fs::metadata(f.path())?.permissions())?;
        }
    }
    Ok(())
}

/// The environment the shipped unit gives the coordinator (its `Environment=` lines): the
/// benchmarks run it as it ships.
pub fn shipped_coordinator_environment() -> Vec<(String, String)> {
    const UNIT: &str = include_str!("../../ops/deploy/systemd/tunnelfleet-coordinator.service");
    UNIT.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn spawn_coordinator(bin: &Path, cfg: &Path) -> anyhow::Result<KillOnDrop> {
    use anyhow::Context;
    let process = crate::children::owned(bin)
        .arg("--config")
        .arg(cfg)
        .envs(shipped_coordinator_environment())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn_owned()
        .context("starting the coordinator")?;
    Ok(KillOnDrop(process))
}

async fn wait_api(api: &tunnelfleet_ops::api::ApiClient) -> anyhow::Result<()> {
    tunnelfleet_standins::wait::wait_until(20, "the coordinator's admin API", || async {
        api.get::<serde_json::Value>("/v1/agents").await.is_ok()
    })
    .await
    .map_err(|e| anyhow::anyhow!("the coordinator did not start: {e}"))?;
    Ok(())
}

/// A `tunnelfleet-coordinator` process as it ships (the `dist` build) for a benchmark: its PKI,
/// admin token and state in a directory of its own, its listeners on loopback; killed on drop.
pub struct BenchCoordinator {
    /// Where agents dial.
    pub control: std::net::SocketAddr,
    /// The admin API.
    pub api: tunnelfleet_ops::api::ApiClient,
    /// The fleet PKI (to issue agents' certificates).
    pub pki_dir: PathBuf,
    /// Its process id (CPU, RSS).
    pub pid: u32,
    bin: PathBuf,
    config: PathBuf,
    _process: KillOnDrop,
}

impl BenchCoordinator {
    /// Starts it in `dir` with `extra` config lines, and waits for its API.
    pub async fn start(dir: &Path, extra: &str) -> anyhow::Result<BenchCoordinator> {
        let bin = dist_binary("tunnelfleet-coordinator", "tunnelfleet-coordinator")?;
        BenchCoordinator::start_binary(&bin, dir, extra).await
    }

    /// Starts `bin` (a coordinator build) in `dir`; a PKI already in `dir/pki` is kept (several
    /// coordinators of one fleet share it).
    pub async fn start_binary(
        bin: &Path,
        dir: &Path,
        extra: &str,
    ) -> anyhow::Result<BenchCoordinator> {
        BenchCoordinator::start_binary_on(bin, dir, extra, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// Like [`BenchCoordinator::start_binary`], its control link on `ip` (`0.0.0.0`: agents in
    /// test hosts reach it at their peer address); the admin API stays on loopback.
    pub async fn start_binary_on(
        bin: &Path,
        dir: &Path,
        extra: &str,
        ip: std::net::Ipv4Addr,
    ) -> anyhow::Result<BenchCoordinator> {
        use std::os::unix::fs::PermissionsExt;
        let pki_dir = dir.join("pki");
        if !pki_dir.join("ca.pem").exists() {
            tunnelfleet_coordinator::pki::init(&pki_dir, &["localhost".into()])?;
        }
        let secret = "bench-token-0123456789abcdef";
        let token = dir.join("admin.token");
        std::fs::write(&token, secret)?;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
        let control = std::net::UdpSocket::bind((ip, 0))?.local_addr()?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let cfg = dir.join("coordinator.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"{control}\"\nadmin_listen = \"{admin}\"\npki_dir = \"{}\"\nstate_dir = \"{}\"\nadmin_token_file = \"{}\"\n{extra}",
                pki_dir.display(),
                dir.join("state").display(),
                token.display()
            ),
        )?;
        let process = spawn_coordinator(bin, &cfg)?;
        let pid = process.0.id();
        let api = tunnelfleet_ops::api::ApiClient::new(&admin.to_string(), secret);
        wait_api(&api).await?;
        Ok(BenchCoordinator {
            control,
            api,
            pki_dir,
            pid,
            bin: bin.to_path_buf(),
            config: cfg,
            _process: process,
        })
    }

    /// Starts it again (after [`BenchCoordinator::kill9`]) with the same config, ports and
    /// state, and waits for its API.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self._process = spawn_coordinator(&self.bin, &self.config)?;
        self.pid = self._process.0.id();
        wait_api(&self.api).await
    }

    /// kill -9: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self._process.0.kill();
        let _ = self._process.0.wait();
    }

    /// Certificates and QUIC client configs for `n` agents `a00000`, `a00001`, … (into `dir`).
    pub fn issue_agents(
        &self,
        n: usize,
        dir: &Path,
    ) -> anyhow::Result<Vec<(String, quinn::ClientConfig)>> {
        (0..n)
            .map(|i| {
                let id = format!("a{i:05}");
                let f = tunnelfleet_coordinator::pki::issue_agent(&self.pki_dir, &id, 1, dir)?;
                let client = tunnelfleet_agent::link::client_config(&f.ca, &f.cert, &f.key)?;
                Ok((id, client))
            })
            .collect()
    }
}
