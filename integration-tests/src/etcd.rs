//! Real etcd clusters on loopback: Debian's `etcd-server` (`/usr/bin/etcd`), every member on
//! free ports with its data in a temp dir, killed on drop. Members can be killed, frozen
//! (SIGSTOP) and started again on their data, which is how losing a member or quorum is
//! tested.

use crate::children::SpawnOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::programs::KillOnDrop;

/// The etcd binary.
pub const ETCD: &str = "/usr/bin/etcd";

/// One member: its ports, its data and (while running) its process.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    dir: PathBuf,
    process: Option<KillOnDrop>,
}

/// An etcd cluster of real members on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Whether etcd is installed; under `CI` its absence fails the test, elsewhere the test
    /// says it was skipped and why.
    pub fn available(test: &str) -> bool {
        if Path::new(ETCD).exists() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {ETCD} is missing and CI is set; install etcd-server");
        }
        crate::skip::skipped(
            test,
            &format!("{ETCD} not found (apt-get install etcd-server)"),
        );
        false
    }

    /// Starts `n` members and waits until the cluster has a leader.
    pub async fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("etcd dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: crate::free_port(),
                peer: crate::free_port(),
                dir: dir.path().join(format!("m{i}")),
                process: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            _dir: dir,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_healthy().await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let log = std::fs::File::create(self._dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log");
        let child = crate::children::owned(ETCD)
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tunnelfleet-test"])
            // Elections within a second on loopback; tests lose members on purpose.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--max-txn-ops", "1024"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn_owned()
            .expect("start etcd");
        self.members[i].process = Some(KillOnDrop(child));
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The store settings for this cluster under `prefix`.
    pub fn store_config(&self, prefix: &str) -> tunnelfleet_coordinator::store::EtcdConfig {
        let mut c = tunnelfleet_coordinator::store::EtcdConfig::new(self.endpoints());
        c.prefix = prefix.to_string();
        c
    }

    /// Kills member `i` (SIGKILL); its data stays.
    pub fn kill(&mut self, i: usize) {
        self.members[i].process = None;
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        if self.members[i].process.is_none() {
            self.spawn(i);
        }
    }

    /// Member `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self._dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }

    /// Waits until a running member reports the cluster healthy (it has a leader).
    pub async fn wait_healthy(&self) {
        let ports: Vec<u16> = self
            .members
            .iter()
            .filter(|m| m.process.is_some())
            .map(|m| m.client)
            .collect();
        crate::wait_until(30, "etcd cluster healthy", || {
            let ports = ports.clone();
            async move {
                for p in ports {
                    if health(p).await {
                        return true;
                    }
                }
                false
            }
        })
        .await;
    }
}

/// Whether the member on `port` answers `/health` with `"health":"true"`.
async fn health(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let req =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut body)).await;
    String::from_utf8_lossy(&body).contains("\"health\":\"true\"")
}
