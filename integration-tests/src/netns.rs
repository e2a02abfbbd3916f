//! Test hosts in network namespaces: each with its own loopback, reached from the test's own
//! namespace over a veth link on 198.18.0.0/15 (the benchmarking range, RFC 2544), so an OMA is
//! a host of its own — its sshd, its API on its own `localhost` — and a fault is a network
//! fault: an nftables drop-all blackholes the host (no RST, no FIN, only silence), a drop on one
//! link cuts off one peer while the others still reach it. Needs root, iproute2 and nftables;
//! nothing leaves the machine.

use crate::children::SpawnOwned;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ports::free_port;

/// 198.18.0.0: every test host gets a /30 of 198.18.0.0/15.
const BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// /30 blocks in 198.18.0.0/15.
const BLOCKS: u32 = 1 << 15;

/// The table a fault adds inside a host's namespace.
const FAULT_TABLE: &str = "tunnelfleet_fault";

/// A host in its own network namespace, linked to the test's namespace.
pub struct NetHost {
    /// The namespace's name (`tf<n>`).
    pub name: String,
    /// Its address on the link (what peers connect to).
    pub addr: Ipv4Addr,
    /// The test side's address on the link.
    pub peer: Ipv4Addr,
    /// The link's interface inside the host (to [`NetHost::cut`] the host off from the test's
    /// namespace, leaving only the links made with [`NetHost::link_to`]).
    pub iface: String,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

fn which(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| Path::new(&d).join(program).exists())
}

impl NetHost {
    /// True when test hosts can be made here (root, `ip`, `nft`, sshd). Panics under CI when
    /// they cannot; otherwise prints why the calling test is skipped.
    pub fn available(test: &str) -> bool {
        let mut missing = Vec::new();
        if !crate::Sshd::available(test) {
            return false;
        }
        if crate::sshd::run_out("id", &["-u"]) != "0" {
            missing.push("root (network namespaces)");
        }
        if !which("ip") {
            missing.push("ip (apt-get install iproute2)");
        }
        if !which("nft") {
            missing.push("nft (apt-get install nftables)");
        }
        if !which("python3") {
            missing.push("python3 (the test hosts' small services)");
        }
        if missing.is_empty() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("{test}: needs {} and CI is set", missing.join(", "));
        }
        crate::skip::skipped(test, &format!("needs {}", missing.join(", ")));
        false
    }

    /// A new host: its namespace, its loopback up, a veth link to the test's namespace.
    pub fn create() -> NetHost {
        let mut last = String::new();
        for _ in 0..50 {
            let block = 1 + rand_block() % (BLOCKS - 1);
            let name = format!("tf{block}");
            if let Err(e) = ip(&["netns", "add", &name]) {
                // Taken by a parallel test (or a leftover): another block.
                last = e;
                continue;
            }
            let host = NetHost {
                addr: Ipv4Addr::from(BASE + block * 4 + 2),
                peer: Ipv4Addr::from(BASE + block * 4 + 1),
                iface: format!("tfn{block}"),
                name,
            };
            match host.link(block) {
                Ok(()) => return host,
                Err(e) => last = e,
            }
        }
        panic!("cannot create a test host: {last}");
    }

    fn link(&self, block: u32) -> Result<(), String> {
        let (outside, inside) = (format!("tfh{block}"), format!("tfn{block}"));
        let peer = format!("{}/30", self.peer);
        let addr = format!("{}/30", self.addr);
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &self.name,
        ])?;
        ip(&["addr", "add", &peer, "dev", &outside])?;
        ip(&["link", "set", &outside, "up"])?;
        ip(&["-n", &self.name, "addr", "add", &addr, "dev", &inside])?;
        ip(&["-n", &self.name, "link", "set", &inside, "up"])?;
        ip(&["-n", &self.name, "link", "set", "lo", "up"])
    }

    /// A direct link from this host to `other` (a veth pair between the two namespaces, on a
    /// /30 of its own), routed so this host reaches `other.addr` over it and not through the
    /// test's namespace: an appliance's own path to an OMA, which [`NetHost::cut`] can break
    /// while everyone else still reaches that OMA. Returns the link's interface inside `other`.
    pub fn link_to(&self, other: &NetHost) -> String {
        for _ in 0..50 {
            let block = 1 + rand_block() % (BLOCKS - 1);
            let (here, there) = (format!("tfl{block}"), format!("tfm{block}"));
            if ip(&[
                "-n",
                &self.name,
                "link",
                "add",
                &here,
                "type",
                "veth",
                "peer",
                "name",
                &there,
                "netns",
                &other.name,
            ])
            .is_err()
            {
                continue;
            }
            let near = Ipv4Addr::from(BASE + block * 4 + 1);
            let far = Ipv4Addr::from(BASE + block * 4 + 2);
            let steps: [Vec<String>; 5] = [
                vec![
                    "-n".into(),
                    self.name.clone(),
                    "addr".into(),
                    "add".into(),
                    format!("{near}/30"),
                    "dev".into(),
                    here.clone(),
                ],
                vec![
                    "-n".into(),
                    self.name.clone(),
                    "link".into(),
                    "set".into(),
                    here.clone(),
                    "up".into(),
                ],
                vec![
                    "-n".into(),
                    other.name.clone(),
                    "addr".into(),
                    "add".into(),
                    format!("{far}/30"),
                    "dev".into(),
                    there.clone(),
                ],
                vec![
                    "-n".into(),
                    other.name.clone(),
                    "link".into(),
                    "set".into(),
                    there.clone(),
                    "up".into(),
                ],
                vec![
                    "-n".into(),
                    self.name.clone(),
                    "route".into(),
                    "add".into(),
                    format!("{}/32", other.addr),
                    "via".into(),
                    far.to_string(),
                ],
            ];
            for step in &steps {
                let args: Vec<&str> = step.iter().map(String::as_str).collect();
                if let Err(e) = ip(&args) {
                    panic!("linking {} to {}: {e}", self.name, other.name);
                }
            }
            return there;
        }
        panic!(
            "no free block for a link from {} to {}",
            self.name, other.name
        );
    }

    /// Cuts one link of this host (`iface`, as [`NetHost::link_to`] returned it): every packet
    /// in or out through it dropped, the host's other links untouched.
    pub fn cut(&self, iface: &str) {
        self.nft(&format!(
            "table inet {FAULT_TABLE} {{\n  chain input {{ type filter hook input priority -300; iifname \"{iface}\" drop; }}\n  chain output {{ type filter hook output priority -300; oifname \"{iface}\" drop; }}\n}}\n"
        ));
    }

    /// `program` to be run inside the host (`ip netns exec NAME program`; the child's pid is
    /// the program's own: `ip` execs it).
    /// A command running `program` inside the host; started with `spawn_owned`, it ends with
    /// the test process ([`crate::children`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = crate::children::owned("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn nft(&self, script: &str) {
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(script.as_bytes()).expect("nft script");
        }
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `GET http://localhost:port{path}` from inside the host (a reverse forward binds on the
    /// OMA's own loopback): the status and body, or why it failed.
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String), String> {
        let script = r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen("http://localhost:%s%s" % (sys.argv[1], sys.argv[2]), timeout=5)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
        let out = self
            .command("python3")
            .args(["-c", script, &port.to_string(), path])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("python3 in {}: {e}", self.name))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        match lines.next().and_then(|s| s.trim().parse().ok()) {
            Some(code) if out.status.success() => Ok((code, lines.collect::<Vec<_>>().join("\n"))),
            _ => Err(format!(
                "GET localhost:{port}{path} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Blackholes the host: every packet in and out dropped (nftables), nothing answered,
    /// nothing reset. Its processes run on, as on a host whose network failed.
    pub fn blackhole(&self) {
        self.nft(&format!(
            "table inet {FAULT_TABLE} {{\n  chain input {{ type filter hook input priority -300; policy drop; }}\n  chain output {{ type filter hook output priority -300; policy drop; }}\n}}\n"
        ));
    }

    /// Ends a fault: the host's network as it was.
    pub fn restore(&self) {
        self.nft(&format!("delete table inet {FAULT_TABLE}\n"));
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn rand_block() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u32
}

/// A small real service inside a test host, on all its addresses (the OMA's API or NBD as the
/// OMA sees them, `localhost:port` there): an HTTP server (Python's `http.server`) whose `/…`
/// answers 200 `"<name> ok"`, or 503 while [`NsHttp::set_failing`] is on; or a TCP echo.
pub struct NsHttp {
    /// Its port (the same on the host's loopback and its link address).
    pub port: u16,
    flag: PathBuf,
    _dir: tempfile::TempDir,
    child: Child,
}

const HTTP_SERVER: &str = r#"
import http.server, os, sys
flag, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        failing = os.path.exists(flag)
        body = (name + (" failing" if failing else " ok")).encode()
        self.send_response(503 if failing else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"#;

const ECHO_SERVER: &str = r#"
import socketserver, sys
class E(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[3])), E).serve_forever()
"#;

impl NsHttp {
    /// An HTTP service inside `host` on a free port.
    pub fn start(host: &NetHost, name: &str) -> NsHttp {
        NsHttp::start_on(host, name, free_port())
    }

    /// An HTTP service inside `host` on `port` (two hosts may use the same one: each has its
    /// own loopback, as two OMAs do).
    pub fn start_on(host: &NetHost, name: &str, port: u16) -> NsHttp {
        NsHttp::spawn(host, name, port, HTTP_SERVER)
    }

    /// A TCP echo inside `host` on `port`.
    pub fn echo_on(host: &NetHost, port: u16) -> NsHttp {
        NsHttp::spawn(host, "echo", port, ECHO_SERVER)
    }

    fn spawn(host: &NetHost, name: &str, port: u16, script: &str) -> NsHttp {
        let dir = tempfile::tempdir().expect("tempdir");
        let flag = dir.path().join("failing");
        let child = host
            .command("python3")
            .args(["-c", script])
            .arg(&flag)
            .arg(name)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn_owned()
            .expect("python3 http.server");
        let mut s = NsHttp {
            port,
            flag,
            _dir: dir,
            child,
        };
        let addr = std::net::SocketAddr::from((host.addr, port));
        for _ in 0..400 {
            // A deadline per try: a host already cut off would hold a plain connect for minutes.
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = s.child.kill();
        panic!("python3 {name} service did not start in {}", host.name);
    }

    /// Makes it answer 503 (`true`) or 200.
    pub fn set_failing(&self, failing: bool) {
        if failing {
            std::fs::write(&self.flag, b"1").expect("flag");
        } else {
            let _ = std::fs::remove_file(&self.flag);
        }
    }
}

impl Drop for NsHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
