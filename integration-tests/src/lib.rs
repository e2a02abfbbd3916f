//! Test harness: real OpenSSH `sshd` instances and small real services, for the end-to-end
//! tests and the benchmarks.
//!
//! Everything binds 127.0.0.1 on a port the OS chose, keys are throwaway files in a temp dir,
//! and every process is killed on drop. Tests that need sshd call [`Sshd::available`]: it fails
//! the test when `CI` is set and sshd is missing, and elsewhere says why the test was skipped.

pub mod smtp;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::control;
use tunnelfleet_agent::status::{AgentStatus, ProfileStatus};
use tunnelfleet_agent::supervisor::{Request, Response};

/// Where Debian's openssh-server puts the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";

/// A real OpenSSH server on 127.0.0.1 with its own keys and config.
pub struct Sshd {
    /// Temp dir with keys, config, pid file.
    pub dir: tempfile::TempDir,
    /// Port it listens on.
    pub port: u16,
    /// The client private key it accepts (mode 0600).
    pub client_key: PathBuf,
    /// A known_hosts file that trusts this server.
    pub known_hosts: PathBuf,
    /// `SHA256:…` of its host key.
    pub fingerprint: String,
    /// The user to log in as (the user running the tests).
    pub user: String,
    child: Option<Child>,
}

impl Sshd {
    /// True when sshd can run here. Panics under CI when it is missing; otherwise prints why
    /// the calling test is skipped.
    pub fn available(test: &str) -> bool {
        if Path::new(SSHD).exists() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {SSHD} is missing and CI is set; install openssh-server");
        }
        eprintln!("SKIPPED {test}: {SSHD} not found (apt-get install openssh-server)");
        false
    }

    /// Starts a fresh sshd with new host and client keys.
    pub fn start() -> Sshd {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        keygen(&d.join("ssh_host_ed25519_key"));
        keygen(&d.join("id_ed25519"));
        std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys"))
            .expect("authorized_keys");
        let user = run_out("id", &["-un"]);
        let fingerprint = host_fingerprint(&d.join("ssh_host_ed25519_key.pub"));
        let mut sshd = Sshd {
            client_key: d.join("id_ed25519"),
            known_hosts: d.join("known_hosts"),
            fingerprint,
            user,
            port: 0,
            child: None,
            dir,
        };
        let _ = std::fs::create_dir_all("/run/sshd");
        for _ in 0..20 {
            sshd.port = free_port();
            if sshd.spawn() {
                sshd.write_known_hosts();
                return sshd;
            }
        }
        panic!("sshd did not start (see its stderr above)");
    }

    /// A copy of a server under a second identity: same client key, new host key, new port.
    pub fn start_sharing_client_key(other: &Sshd) -> Sshd {
        let s = Sshd::start();
        std::fs::copy(
            other.dir.path().join("id_ed25519.pub"),
            s.dir.path().join("authorized_keys"),
        )
        .expect("authorized_keys");
        s
    }

    fn write_config(&self) -> PathBuf {
        let d = self.dir.path();
        let cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/ssh_host_ed25519_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\nGatewayPorts no\nMaxStartups 100\nMaxSessions 100\nLogLevel VERBOSE\n",
            port = self.port,
            d = d.display()
        );
        let path = d.join("sshd_config");
        std::fs::write(&path, cfg).expect("sshd_config");
        path
    }

    fn spawn(&mut self) -> bool {
        let cfg = self.write_config();
        let log = std::fs::File::create(self.dir.path().join("sshd.log")).expect("log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sshd");
        self.child = Some(child);
        for _ in 0..200 {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    }

    fn write_known_hosts(&self) {
        let pubkey = std::fs::read_to_string(self.dir.path().join("ssh_host_ed25519_key.pub"))
            .expect("host pub");
        let mut parts = pubkey.split_whitespace();
        let line = format!(
            "[127.0.0.1]:{} {} {}\n",
            self.port,
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        );
        std::fs::write(&self.known_hosts, line).expect("known_hosts");
    }

    /// The `127.0.0.1:port` endpoint string.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The listener's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Pids of the per-connection processes the listener forked (and theirs).
    pub fn session_pids(&self) -> Vec<u32> {
        self.pid().map(descendants).unwrap_or_default()
    }

    /// Kills the listener and every session process (as a host going down would).
    pub fn kill_all(&mut self) {
        for pid in self.session_pids() {
            signal(pid, libc::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts sshd again on the same port with the same keys.
    pub fn restart(&mut self) {
        for _ in 0..100 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sshd did not restart on port {}", self.port);
    }

    /// SIGSTOPs the listener and every session process: no RST, no FIN, only silence.
    pub fn freeze(&self) -> Vec<u32> {
        let mut pids = self.session_pids();
        pids.extend(self.pid());
        for &p in &pids {
            signal(p, libc::SIGSTOP);
        }
        pids
    }

    /// SIGCONTs the given processes.
    pub fn thaw(pids: &[u32]) {
        for &p in pids {
            signal(p, libc::SIGCONT);
        }
    }

    /// The sshd log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        for pid in self.session_pids() {
            signal(pid, libc::SIGCONT);
            signal(pid, libc::SIGKILL);
        }
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGCONT);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal with kill(1) (no unsafe code in the workspace).
pub fn signal(pid: u32, sig: i32) {
    signal_target(&pid.to_string(), sig)
}

/// Sends `sig` to every process of the process group `pgid`.
pub fn signal_group(pgid: u32, sig: i32) {
    signal_target(&format!("-{pgid}"), sig)
}

fn signal_target(target: &str, sig: i32) {
    let name = match sig {
        libc::SIGKILL => "KILL",
        libc::SIGSTOP => "STOP",
        libc::SIGCONT => "CONT",
        libc::SIGTERM => "TERM",
        _ => "INT",
    };
    let _ = Command::new("kill")
        .args([format!("-{name}"), "--".into(), target.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// All descendants of `pid`, from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            break;
        };
        for e in entries.flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // Field 4 (after the ")" closing the command name) is the parent pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(p) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Generates an ed25519 key with ssh-keygen (mode 0600).
pub fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "tunnelfleet-test",
            "-f",
        ])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(ok.success(), "ssh-keygen failed");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn host_fingerprint(pubfile: &Path) -> String {
    let out = run_out(
        "ssh-keygen",
        &["-l", "-E", "sha256", "-f", &pubfile.display().to_string()],
    );
    out.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

fn run_out(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A port that was free a moment ago (for services that cannot bind port 0 themselves).
/// Never the same port twice in one test process: the kernel readily hands a just-released
/// port to the next `bind(0)`, and two tests running side by side once got the same one (a
/// coordinator's admin API and another test's forward).
pub fn free_port() -> u16 {
    unique_port(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    })
}

/// Calls `pick` until it returns a port this process has not handed out before.
fn unique_port(pick: impl Fn() -> u16) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = pick();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A TCP echo server on 127.0.0.1 (stops when the guard drops).
pub async fn echo_server() -> (u16, tokio_util::sync::DropGuard) {
    tunnelfleet_ops::services::echo_server()
        .await
        .expect("echo server")
}

pub use tunnelfleet_ops::services::{HttpService, Received, WebhookSink};

/// The demo's HTTP `/health` service on 127.0.0.1 (any port), reused as OMA/VMA APIs in tests.
pub async fn http_service(name: &str) -> HttpService {
    HttpService::start(name, 0).await.expect("http service")
}

/// GET `http://127.0.0.1:port/path`; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}

/// Sends `payload` through `port` and expects it echoed back.
pub async fn echo_roundtrip(port: u16, payload: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("echo timeout"))??;
    if back != payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Polls `cond` every 50 ms until it is true or `secs` pass; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(secs);
    loop {
        if cond().await {
            // Shown with --nocapture: where a slow test spends its time.
            eprintln!("waited {:?} for: {what}", start.elapsed());
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent running in this process with a real control socket.
pub struct TestAgent {
    /// Its control socket.
    pub socket: PathBuf,
    /// Where it serves `/metrics`, when `agent.metrics_listen` was given.
    pub metrics: Option<std::net::SocketAddr>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestAgent {
    /// Starts an agent from TOML (the `[agent]` section is added: socket in a temp dir).
    pub async fn start(profiles_toml: &str) -> TestAgent {
        Self::start_with("", profiles_toml).await
    }

    /// Like [`TestAgent::start`], with `agent_keys` (TOML lines) added to the `[agent]` section.
    pub async fn start_with(agent_keys: &str, profiles_toml: &str) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let text = format!(
            "[agent]\ncontrol_socket = \"{}\"\ndrain_timeout = \"1s\"\n{agent_keys}\n\n{profiles_toml}",
            socket.display()
        );
        let cfg = AgentConfig::parse(&text, Path::new("test.toml")).expect("test config");
        let agent = tunnelfleet_agent::agent::Agent::prepare(&cfg)
            .await
            .expect("agent prepare");
        let metrics = agent.metrics_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent.run(stop.clone()));
        TestAgent {
            socket,
            metrics,
            stop,
            task: Some(task),
            _dir: dir,
        }
    }

    /// Status through the control socket.
    pub async fn status(&self) -> AgentStatus {
        match control::call(&self.socket, &Request::Status).await {
            Ok(Response::Status(s)) => s,
            other => panic!("status: {other:?}"),
        }
    }

    /// One profile's status.
    pub async fn profile(&self, name: &str) -> ProfileStatus {
        self.status()
            .await
            .profiles
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no profile {name}"))
    }

    /// Sends a command.
    pub async fn call(&self, req: Request) -> Response {
        control::call(&self.socket, &req)
            .await
            .expect("control call")
    }

    /// Stops the agent gracefully and waits for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A profile block for tests, with short timings so failures show in seconds.
pub fn profile_toml(
    name: &str,
    endpoints: &[String],
    sshd: &Sshd,
    forwards: &[String],
    extra: &str,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let fws: Vec<String> = forwards.iter().map(|f| format!("{f:?}")).collect();
    format!(
        "[[profile]]\nname = \"{name}\"\nendpoints = [{}]\nuser = \"{}\"\nidentity_file = \"{}\"\n\
         known_hosts = \"{}\"\nforwards = [{}]\nconnect_timeout = \"2s\"\nkeepalive_interval = \"1s\"\n\
         keepalive_count = 2\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nfailover_after = 2\n{extra}\n",
        eps.join(", "),
        sshd.user,
        sshd.client_key.display(),
        sshd.known_hosts.display(),
        fws.join(", "),
    )
}

impl TestAgent {
    /// An agent with one profile named `oma` on `sshd` (short test timings; `extra` TOML lines
    /// are added to the profile).
    pub async fn on(sshd: &Sshd, forwards: &[String], extra: &str) -> TestAgent {
        TestAgent::start(&profile_toml(
            "oma",
            &[sshd.endpoint()],
            sshd,
            forwards,
            extra,
        ))
        .await
    }

    /// An agent with one profile `oma` whose endpoints are `primary` then `standby` (both
    /// host keys pinned).
    pub async fn on_pair(primary: &Sshd, standby: &Sshd, forwards: &[String]) -> TestAgent {
        let pins = format!(
            "host_key_fingerprints = [{:?}, {:?}]",
            primary.fingerprint, standby.fingerprint
        );
        let endpoints = [primary.endpoint(), standby.endpoint()];
        TestAgent::start(&profile_toml("oma", &endpoints, primary, forwards, &pins)).await
    }

    /// Waits until profile `name` is up with every forward active.
    pub async fn wait_all_active(&self, name: &str) {
        wait_until(
            30,
            &format!("profile {name} up with every forward active"),
            || async {
                // A pushed profile appears only once applied: absent means not yet.
                self.status().await.profiles.iter().any(|p| {
                    p.name == name
                        && p.state == tunnelfleet_agent::status::SessionState::Up
                        && p.forwards
                            .iter()
                            .all(|f| f.state == tunnelfleet_agent::status::ForwardState::Active)
                })
            },
        )
        .await;
    }
}

/// SOCKS5 CONNECT through `port` to (`atyp`, `addr`, `target`); returns the stream and the
/// reply code (0 = success).
pub async fn socks_connect(
    port: u16,
    atyp: u8,
    addr: &[u8],
    target: u16,
) -> std::io::Result<(TcpStream, u8)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut greet = [0u8; 2];
    s.read_exact(&mut greet).await?;
    if greet != [5, 0] {
        return Err(std::io::Error::other(format!("SOCKS greeting {greet:?}")));
    }
    let mut req = vec![5, 1, 0, atyp];
    if atyp == 3 {
        req.push(addr.len() as u8);
    }
    req.extend(addr);
    req.extend(target.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    Ok((s, rep[1]))
}

/// A coordinator in this process: real QUIC on loopback, sled on disk.
pub struct TestCoordinator {
    /// Where agents dial.
    pub addr: std::net::SocketAddr,
    /// Its state.
    pub fleet: Arc<tunnelfleet_coordinator::fleet::Fleet>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestCoordinator {
    /// Starts on 127.0.0.1:`port` (0 for any) with the PKI in `pki_dir` and state in `state_dir`.
    pub async fn start(pki_dir: &Path, state_dir: &Path, port: u16) -> TestCoordinator {
        let cfg = tunnelfleet_coordinator::tls::server_config(pki_dir).expect("server config");
        let bind = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // A restart on the same port may find the old socket still being released: retry
        // with a deadline rather than fail on the first EADDRINUSE.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let endpoint = loop {
            match quinn::Endpoint::server(cfg.clone(), bind) {
                Ok(e) => break e,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("bind coordinator on {bind}: {e}"),
            }
        };
        let addr = endpoint.local_addr().expect("addr");
        let store = tunnelfleet_coordinator::store::Store::open(state_dir).expect("store");
        let fleet = tunnelfleet_coordinator::fleet::Fleet::new(store, Duration::from_millis(500)).0;
        let stop = CancellationToken::new();
        let task = tokio::spawn(tunnelfleet_coordinator::link::serve(
            endpoint,
            fleet.clone(),
            tunnelfleet_coordinator::link::LinkContext::default(),
            stop.clone(),
        ));
        TestCoordinator {
            addr,
            fleet,
            stop,
            task,
        }
    }

    /// Stops it and waits until its store is closed (so it can be reopened).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        let fleet = self.fleet;
        wait_until(10, "coordinator connections closed", || {
            let n = Arc::strong_count(&fleet);
            async move { n == 1 }
        })
        .await;
    }
}

use std::sync::Arc;

/// The whole coordinator in this process (control link, watcher, hooks, admin API), as the
/// binary runs it, on loopback ports with state in `dir`.
pub struct FullCoordinator {
    /// Where agents dial.
    pub control: std::net::SocketAddr,
    /// The admin API.
    pub api: tunnelfleet_ops::api::ApiClient,
    /// Its state.
    pub fleet: Arc<tunnelfleet_coordinator::fleet::Fleet>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl FullCoordinator {
    /// Starts with PKI in `dir/pki` (created if missing), state in `dir/state`, and `hooks`.
    pub async fn start(
        dir: &Path,
        heartbeat: Duration,
        hooks: Vec<tunnelfleet_coordinator::hooks::HookConfig>,
    ) -> FullCoordinator {
        use tunnelfleet_coordinator::server::{CoordinatorConfig, bind};
        let pki_dir = dir.join("pki");
        if !pki_dir.join("ca.pem").exists() {
            tunnelfleet_coordinator::pki::init(&pki_dir, &["localhost".into()]).expect("pki");
        }
        let token_file = dir.join("admin.token");
        let token = "integration-test-admin-token-0123456789";
        write_secret(&token_file, token.as_bytes());
        let bound = bind(&CoordinatorConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            pki_dir,
            state_dir: dir.join("state"),
            admin_token_file: token_file,
            heartbeat_interval: heartbeat,
            alerts: Default::default(),
            hooks,
            metrics_listen: None,
            udp_buffer: tunnelfleet_coordinator::udp::DEFAULT_BUFFER,
        })
        .await
        .expect("coordinator bind");
        let (control, admin, fleet) = (bound.control, bound.admin, bound.fleet.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(bound.run(stop.clone()));
        FullCoordinator {
            control,
            api: tunnelfleet_ops::api::ApiClient::new(&admin.to_string(), token),
            fleet,
            stop,
            task,
        }
    }

    /// The `[coordinator]` section for agent `id` (certificate issued into `dir/id`).
    pub fn agent_section(&self, dir: &Path, id: &str, labels: &str) -> String {
        let files =
            tunnelfleet_coordinator::pki::issue_agent(&dir.join("pki"), id, 1, &dir.join(id))
                .expect("issue agent");
        format!(
            "[coordinator]\naddress = \"{}\"\nserver_name = \"localhost\"\nagent_id = \"{id}\"\nlabels = {{ {labels} }}\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n",
            self.control,
            files.ca.display(),
            files.cert.display(),
            files.key.display(),
            dir.join(id).join("state").display()
        )
    }

    /// Stops it gracefully.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Writes a file readable by its owner only.
pub fn write_secret(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("secret file");
    f.write_all(bytes).expect("write secret");
}

/// `n` client endpoints (UDP sockets) for simulated agents, each shared by many of them as
/// NATed appliances would share an address, with the coordinator's buffer size: one socket
/// standing in for a thousand appliances needs a thousand appliances' room.
pub fn sim_endpoints(n: usize) -> std::io::Result<Vec<quinn::Endpoint>> {
    use tunnelfleet_coordinator::udp;
    (0..n)
        .map(|_| {
            let b = udp::bind(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                udp::DEFAULT_BUFFER,
            )?;
            udp::endpoint(b.socket, None)
        })
        .collect()
}

/// Answers every connection on `listener` with an OpenSSH banner, as a live OMA answers the
/// coordinator's probes.
pub fn serve_ssh_banner(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 test\r\n").await;
        }
    });
}

/// Puts OMA group `oma` on the coordinator behind `api`: primary `dead` (nothing need listen
/// there), then a standby that answers probes like an sshd; probed every 200 ms, failback after
/// 5 min. Returns the standby's address.
pub async fn put_probed_group(api: &tunnelfleet_ops::api::ApiClient, dead: &str) -> String {
    let standby = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("standby");
    let standby_addr = standby.local_addr().expect("addr").to_string();
    serve_ssh_banner(standby);
    let group = tunnelfleet_coordinator::store::OmaGroup::probed(
        "oma",
        vec![dead.to_string(), standby_addr.clone()],
        Duration::from_millis(200),
        Duration::from_millis(200),
        Duration::from_secs(300),
    );
    let _: serde_json::Value = api
        .call("PUT", "/v1/groups/oma", Some(&group))
        .await
        .expect("PUT /v1/groups/oma");
    standby_addr
}

/// A protocol-level agent for benchmarks: real QUIC and mutual TLS, no SSH. Connects with
/// jittered backoff like a real agent (at most `gate` handshakes at once), reports `up` once
/// connected, heartbeats every `heartbeat` (spread by `i`), and acknowledges every push after
/// reporting it on `pushes` with the time it arrived.
#[allow(clippy::too_many_arguments)]
pub fn spawn_sim_agent(
    i: usize,
    hello: tunnelfleet_protocol::Hello,
    client: quinn::ClientConfig,
    ep: quinn::Endpoint,
    addr: std::net::SocketAddr,
    heartbeat: Duration,
    gate: Arc<tokio::sync::Semaphore>,
    up: tokio::sync::mpsc::UnboundedSender<()>,
    pushes: tokio::sync::mpsc::UnboundedSender<(
        usize,
        tunnelfleet_protocol::ProfileSet,
        std::time::Instant,
    )>,
) {
    use tunnelfleet_protocol::{Applied, CoordinatorMessage, Heartbeat};
    tokio::spawn(async move {
        let mut backoff = tunnelfleet_agent::backoff::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        let mut link = loop {
            let attempt = {
                let _permit = gate.acquire().await;
                tunnelfleet_agent::link::connect(
                    &ep,
                    client.clone(),
                    addr,
                    "localhost",
                    hello.clone(),
                )
                .await
            };
            match attempt {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(backoff.next_delay()).await,
            }
        };
        let _ = up.send(());
        // Spread heartbeats over the interval, as real agents started at different times.
        let offset = Duration::from_millis((i as u64 * 7919) % heartbeat.as_millis().max(1) as u64);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, heartbeat);
        let mut seq = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    if link.heartbeat(Heartbeat { seq, sent_unix_ms: 0, profiles: vec![] }).await.is_err() {
                        return;
                    }
                }
                m = link.next() => match m {
                    Ok(CoordinatorMessage::Push(set)) => {
                        let version = set.version;
                        let _ = pushes.send((i, set, std::time::Instant::now()));
                        if link.applied(Applied { version, ok: true, results: vec![] }).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
}

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

/// A UDP port that was free a moment ago (a coordinator restarted on the same address).
pub fn free_udp_port() -> u16 {
    unique_port(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    })
}

/// A `tunnelfleet-coordinator` process on loopback, for tests that kill it for real.
pub struct CoordinatorProcess {
    /// Where agents dial.
    pub control: std::net::SocketAddr,
    /// The admin API.
    pub api: tunnelfleet_ops::api::ApiClient,
    /// The admin API's address (for the CLI: `--coordinator`).
    pub admin: std::net::SocketAddr,
    /// The admin token file (for the CLI: `--token-file`).
    pub token_file: PathBuf,
    /// Its config file (a restart uses the same).
    pub config: PathBuf,
    env: Vec<(String, String)>,
    child: std::process::Child,
    log: PathBuf,
}

impl CoordinatorProcess {
    /// Waits until the first hook holds exactly one undelivered entry whose last attempt failed
    /// with `error` in its message (`tunnelfleet alerts hooks`).
    pub async fn wait_hook_backlog(&self, error: &str) {
        wait_until(
            30,
            &format!("one delivery kept in the outbox after {error:?}"),
            || async {
                let h: serde_json::Value = self.api.get("/v1/hooks").await.unwrap_or_default();
                h[0]["pending"] == 1
                    && h[0]["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains(error))
            },
        )
        .await;
    }
    /// Writes a config under `dir` (PKI in `dir/pki`, state in `dir/state`, fixed ports) and
    /// starts the coordinator; returns once its admin API answers.
    pub async fn start(dir: &Path, heartbeat: &str) -> CoordinatorProcess {
        Self::start_with(dir, heartbeat, "").await
    }

    /// As [`CoordinatorProcess::start`], with more config (`[[hook]]`s) appended.
    pub async fn start_with(dir: &Path, heartbeat: &str, extra: &str) -> CoordinatorProcess {
        Self::start_with_env(dir, heartbeat, extra, &[]).await
    }

    /// As [`CoordinatorProcess::start_with`], with environment variables for the process.
    pub async fn start_with_env(
        dir: &Path,
        heartbeat: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> CoordinatorProcess {
        let control = std::net::SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let token_file = dir.join("admin.token");
        let token = "integration-test-admin-token-0123456789";
        write_secret(&token_file, token.as_bytes());
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{control}\"\nadmin_listen = \"{admin}\"\npki_dir = \"{}\"\nstate_dir = \"{}\"\n\
                 admin_token_file = \"{}\"\nheartbeat_interval = \"{heartbeat}\"\n{extra}",
                dir.join("pki").display(),
                dir.join("state").display(),
                token_file.display()
            ),
        )
        .expect("coordinator config");
        let api = tunnelfleet_ops::api::ApiClient::new(&admin.to_string(), token);
        let log = dir.join("coordinator.log");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::spawn(&config, &log, &env);
        let mut c = CoordinatorProcess {
            env,
            control,
            api,
            admin,
            token_file,
            config,
            child,
            log,
        };
        c.wait_ready().await;
        c
    }

    fn spawn(config: &Path, log: &Path, env: &[(String, String)]) -> std::process::Child {
        let bin = Program::Coordinator.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        Command::new(bin)
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn coordinator")
    }

    async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .api
                .get::<serde_json::Value>("/v1/agents")
                .await
                .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("coordinator exited with {status}:\n{}", self.log());
            }
            if std::time::Instant::now() > deadline {
                panic!("coordinator not ready within 30s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same config (state dir and ports).
    pub async fn restart(&mut self) {
        self.child = Self::spawn(&self.config, &self.log, &self.env);
        self.wait_ready().await;
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill9();
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
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--profile",
            "dist",
            "-q",
            "-p",
            package,
            "--bin",
            bin,
        ])
        .status()?;
    if !status.success() || !path.exists() {
        return Err(std::io::Error::other(format!(
            "could not build {}",
            path.display()
        )));
    }
    Ok(path)
}

/// A valid profile as the coordinator holds it (tests and benchmarks), forwarding `forwards`.
pub fn profile_spec(name: &str, forwards: &[&str]) -> tunnelfleet_protocol::ProfileSpec {
    let mut p = tunnelfleet_protocol::ProfileSpec::new(name, "vma", "/etc/tunnelfleet/id");
    p.endpoints = vec!["oma-a:443".into(), "oma-b:443".into()];
    p.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
    p.forwards = forwards.iter().map(|f| f.to_string()).collect();
    p
}
