//! A real OpenSSH `sshd` on 127.0.0.1 with a random port and throwaway keys, and the
//! faults it can be put through (kill, SIGSTOP of the listener and every session child).

use crate::children::SpawnOwned;
use crate::faults::{descendants, signal};
use crate::ports::free_port;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
    /// Lines added at the end of its sshd_config.
    extra_config: String,
    /// The test host it runs in (namespace, address); None: this namespace, 127.0.0.1.
    host: Option<(String, std::net::Ipv4Addr)>,
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
        crate::skip::skipped(
            test,
            &format!("{SSHD} not found (apt-get install openssh-server)"),
        );
        false
    }

    /// Starts a fresh sshd with new host and client keys.
    pub fn start() -> Sshd {
        Sshd::start_with("")
    }

    /// Like [`Sshd::start`], with `extra` lines at the end of its sshd_config (an `Include` of
    /// a drop-in, a `PermitListen`).
    pub fn start_with(extra: &str) -> Sshd {
        Sshd::start_at(None, extra)
    }

    /// A fresh sshd inside test host `host`, listening on its address.
    pub fn start_in(host: &crate::NetHost) -> Sshd {
        Sshd::start_at(Some((host.name.clone(), host.addr)), "")
    }

    /// Like [`Sshd::start_sharing_client_key`], inside test host `host`.
    pub fn start_sharing_client_key_in(other: &Sshd, host: &crate::NetHost) -> Sshd {
        let s = Sshd::start_in(host);
        std::fs::copy(
            other.dir.path().join("id_ed25519.pub"),
            s.dir.path().join("authorized_keys"),
        )
        .expect("authorized_keys");
        s
    }

    fn start_at(host: Option<(String, std::net::Ipv4Addr)>, extra: &str) -> Sshd {
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
            extra_config: extra.to_string(),
            host,
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
            "Port {port}\nListenAddress {listen}\nHostKey {d}/ssh_host_ed25519_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\nGatewayPorts no\nMaxStartups 100\nMaxSessions 100\nLogLevel VERBOSE\n{extra}\n",
            port = self.port,
            listen = self.listen(),
            d = d.display(),
            extra = self.extra_config,
        );
        let path = d.join("sshd_config");
        std::fs::write(&path, cfg).expect("sshd_config");
        path
    }

    fn spawn(&mut self) -> bool {
        let cfg = self.write_config();
        // Appended: a restarted sshd's log keeps the logins of the sessions that survived it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let mut command = match &self.host {
            Some((ns, _)) => {
                let mut c = crate::children::owned("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => crate::children::owned(SSHD),
        };
        let child = command
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn_owned()
            .expect("spawn sshd");
        self.child = Some(child);
        for _ in 0..200 {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if std::net::TcpStream::connect((self.listen(), self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        // Not listening in time (a busy machine): ended here, not left running while a new one
        // takes its place.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        false
    }

    /// The address it listens on.
    fn listen(&self) -> std::net::Ipv4Addr {
        self.host
            .as_ref()
            .map(|(_, a)| *a)
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST)
    }

    fn write_known_hosts(&self) {
        let pubkey = std::fs::read_to_string(self.dir.path().join("ssh_host_ed25519_key.pub"))
            .expect("host pub");
        let mut parts = pubkey.split_whitespace();
        let line = format!(
            "[{}]:{} {} {}\n",
            self.listen(),
            self.port,
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        );
        std::fs::write(&self.known_hosts, line).expect("known_hosts");
    }

    /// The `address:port` endpoint string (`127.0.0.1:port` unless in a test host).
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.listen(), self.port)
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

    /// Starts sshd again with `extra` as its added config lines (same port, same keys).
    pub fn restart_with(&mut self, extra: &str) {
        self.kill_all();
        self.extra_config = extra.to_string();
        self.restart();
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
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file sshd logs into (`-e`, LogLevel VERBOSE: each login with its key).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
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

/// OpenSSH's own client logging in to `sshd` with `key` (and `KEY-cert.pub`, a certificate
/// for it, when there is one) and running `true`: whether it got in, and what it said.
pub fn ssh_login(sshd: &Sshd, key: &Path) -> (bool, String) {
    let out = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &sshd.port.to_string()])
        .arg(format!("{}@127.0.0.1", sshd.user))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .expect("ssh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

pub(crate) fn host_fingerprint(pubfile: &Path) -> String {
    let out = run_out(
        "ssh-keygen",
        &["-l", "-E", "sha256", "-f", &pubfile.display().to_string()],
    );
    out.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn run_out(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A real OpenSSH client holding `R localhost:remote_port:127.0.0.1:to_port` on `sshd` (the
/// way a session from before a reconnect holds the port); SIGSTOP it to leave a stale session.
pub fn ssh_holding_remote_port(sshd: &Sshd, remote_port: u16, to_port: u16) -> Child {
    let child = crate::children::owned("ssh")
        .args([
            "-N",
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-i"])
        .arg(&sshd.client_key)
        .args(["-p", &sshd.port.to_string(), "-R"])
        .arg(format!("localhost:{remote_port}:127.0.0.1:{to_port}"))
        .arg(format!("{}@127.0.0.1", sshd.user))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_owned()
        .expect("spawn ssh");
    let mut child = child;
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", remote_port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("ssh -R {remote_port} did not bind on the server");
}
