//! Coordinators for tests: the control link alone in this process, the whole coordinator in
//! this process, and the real `tunnelfleet-coordinator` binary as a process to kill -9.

use crate::children::SpawnOwned;
use crate::ports::{free_port, free_udp_port};
use crate::programs::Program;
use crate::services::{serve_ssh_banner, write_secret};
use crate::wait::wait_until;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

mod process;
pub use process::CoordinatorProcess;

/// The admin token of every coordinator the tests start (written to `DIR/admin.token`).
pub const ADMIN_TOKEN: &str = "integration-test-admin-token-0123456789";

/// The coordinator's QUIC endpoint with the PKI in `pki_dir` on 127.0.0.1:`port` (0 for any).
/// A restart on the same port may find the old socket still being released: retried with a
/// deadline rather than failed on the first EADDRINUSE.
async fn quic_server(pki_dir: &Path, port: u16) -> quinn::Endpoint {
    let cfg = tunnelfleet_coordinator::tls::server_config(pki_dir).expect("server config");
    let bind = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match quinn::Endpoint::server(cfg.clone(), bind) {
            Ok(e) => return e,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("bind coordinator on {bind}: {e}"),
        }
    }
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
        let endpoint = quic_server(pki_dir, port).await;
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

/// The whole coordinator in this process (control link, watcher, hooks, admin API), as the
/// binary runs it, on loopback ports with state in `dir`.
pub struct FullCoordinator {
    /// Where agents dial.
    pub control: std::net::SocketAddr,
    /// The admin API's address (for the CLI as a process).
    pub admin: std::net::SocketAddr,
    /// The admin API.
    pub api: tunnelfleet_ops::api::ApiClient,
    /// Its state.
    pub fleet: Arc<tunnelfleet_coordinator::fleet::Fleet>,
    /// The fleet page, when started with one ([`FullCoordinator::start_with_page`]).
    pub web: Option<std::net::SocketAddr>,
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
        FullCoordinator::start_on(dir, heartbeat, hooks, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// Like [`FullCoordinator::start`], its control link on `ip` (a test host's peer address,
    /// for agents inside test hosts); the admin API stays on 127.0.0.1.
    pub async fn start_on(
        dir: &Path,
        heartbeat: Duration,
        hooks: Vec<tunnelfleet_coordinator::hooks::HookConfig>,
        ip: std::net::Ipv4Addr,
    ) -> FullCoordinator {
        FullCoordinator::start_with_rules(dir, heartbeat, hooks, ip, Default::default()).await
    }

    /// Like [`FullCoordinator::start_on`], with alert rules of the test's own.
    pub async fn start_with_rules(
        dir: &Path,
        heartbeat: Duration,
        hooks: Vec<tunnelfleet_coordinator::hooks::HookConfig>,
        ip: std::net::Ipv4Addr,
        alerts: tunnelfleet_coordinator::monitor::AlertRules,
    ) -> FullCoordinator {
        FullCoordinator::start_full(
            dir,
            heartbeat,
            hooks,
            ip,
            alerts,
            tunnelfleet_coordinator::sshca::DEFAULT_VALIDITY,
            false,
            None,
        )
        .await
    }

    /// Like [`FullCoordinator::start`], with the fleet page on 127.0.0.1 (`web`).
    pub async fn start_with_page(
        dir: &Path,
        heartbeat: Duration,
        hooks: Vec<tunnelfleet_coordinator::hooks::HookConfig>,
    ) -> FullCoordinator {
        FullCoordinator::start_full(
            dir,
            heartbeat,
            hooks,
            std::net::Ipv4Addr::LOCALHOST,
            Default::default(),
            tunnelfleet_coordinator::sshca::DEFAULT_VALIDITY,
            true,
            None,
        )
        .await
    }

    /// Like [`FullCoordinator::start`], its agents' SSH certificates valid for `validity`.
    pub async fn start_with_ssh_validity(
        dir: &Path,
        heartbeat: Duration,
        validity: Duration,
    ) -> FullCoordinator {
        let ip = std::net::Ipv4Addr::LOCALHOST;
        FullCoordinator::start_full(
            dir,
            heartbeat,
            Vec::new(),
            ip,
            Default::default(),
            validity,
            false,
            None,
        )
        .await
    }

    /// Like [`FullCoordinator::start`], named `name` on the etcd store `etcd` (its PKI in
    /// `dir/pki`: copy one fleet's there for a second coordinator).
    pub async fn start_on_etcd(
        dir: &Path,
        heartbeat: Duration,
        name: &str,
        etcd: tunnelfleet_coordinator::store::EtcdConfig,
    ) -> FullCoordinator {
        FullCoordinator::start_full(
            dir,
            heartbeat,
            Vec::new(),
            std::net::Ipv4Addr::LOCALHOST,
            Default::default(),
            tunnelfleet_coordinator::sshca::DEFAULT_VALIDITY,
            false,
            Some((name, etcd)),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_full(
        dir: &Path,
        heartbeat: Duration,
        hooks: Vec<tunnelfleet_coordinator::hooks::HookConfig>,
        ip: std::net::Ipv4Addr,
        alerts: tunnelfleet_coordinator::monitor::AlertRules,
        ssh_cert_validity: Duration,
        page: bool,
        etcd: Option<(&str, tunnelfleet_coordinator::store::EtcdConfig)>,
    ) -> FullCoordinator {
        use tunnelfleet_coordinator::server::{CoordinatorConfig, StoreKind, bind};
        let pki_dir = dir.join("pki");
        if !pki_dir.join("ca.pem").exists() {
            tunnelfleet_coordinator::pki::init(&pki_dir, &["localhost".into()]).expect("pki");
        }
        let token_file = dir.join("admin.token");
        let token = ADMIN_TOKEN;
        write_secret(&token_file, token.as_bytes());
        let bound = bind(&CoordinatorConfig {
            listen: std::net::SocketAddr::from((ip, 0)),
            admin_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_tls: false,
            admin_plaintext_on_network: false,
            pki_dir,
            state_dir: dir.join("state"),
            store: if etcd.is_some() {
                StoreKind::Etcd
            } else {
                StoreKind::Sled
            },
            name: etcd.as_ref().map(|(name, _)| name.to_string()),
            etcd: etcd.map(|(_, e)| e),
            admin_token_file: token_file,
            heartbeat_interval: heartbeat,
            ssh_cert_validity,
            alerts,
            hooks,
            metrics_listen: None,
            web_listen: page.then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            udp_buffer: tunnelfleet_coordinator::udp::DEFAULT_BUFFER,
        })
        .await
        .expect("coordinator bind");
        let (control, admin, fleet) = (bound.control, bound.admin, bound.fleet.clone());
        let web = bound.web;
        let stop = CancellationToken::new();
        let task = tokio::spawn(bound.run(stop.clone()));
        FullCoordinator {
            control,
            admin,
            api: tunnelfleet_ops::api::ApiClient::new(&admin.to_string(), token),
            fleet,
            web,
            stop,
            task,
        }
    }

    /// The `[coordinator]` section for agent `id` (certificate issued into `dir/id`).
    pub fn agent_section(&self, dir: &Path, id: &str, labels: &str) -> String {
        agent_section(self.control, dir, id, labels)
    }

    /// Stops it gracefully.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Puts the test profile block `profile_toml` (one `[[profile]]`, as [`crate::profile_toml`]
/// writes it) on the coordinator behind `api` as profile `name` of OMA group `group` (its
/// endpoints dropped: the group's are pushed) and assigns it to agent `name`.
pub async fn assign_group_profile(
    api: &tunnelfleet_ops::api::ApiClient,
    name: &str,
    group: &str,
    profile_toml: &str,
) {
    let local = tunnelfleet_agent::config::AgentConfig::parse(profile_toml, Path::new("p.toml"))
        .expect("test profile");
    let mut spec = local.profiles[0].clone();
    spec.group = Some(group.into());
    spec.endpoints.clear();
    put_and_assign(api, &spec, name).await;
}

/// Puts `spec` on the coordinator behind `api` (as profile `spec.name`) and assigns it to
/// agent `agent`, through the admin API; returns the fleet version of the assignment.
pub async fn put_and_assign(
    api: &tunnelfleet_ops::api::ApiClient,
    spec: &tunnelfleet_protocol::ProfileSpec,
    agent: &str,
) -> u64 {
    use tunnelfleet_coordinator::admin::Changed;
    let _: Changed = api
        .call("PUT", &format!("/v1/profiles/{}", spec.name), Some(spec))
        .await
        .expect("put profile");
    let assigned: Changed = api
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({"profile": spec.name, "agent": agent})),
        )
        .await
        .expect("assign");
    assigned.version
}

/// Puts OMA group `oma` on the coordinator behind `api` with one endpoint nobody listens on
/// (probed every 200 ms: down, and its `oma_down` fired, after three probes); returns the
/// endpoint, so a test can bring it up (`serve_ssh_banner`) to resolve the incident.
pub async fn put_dead_group(api: &tunnelfleet_ops::api::ApiClient) -> String {
    use tunnelfleet_coordinator::admin::Changed;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let endpoint = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let g = tunnelfleet_coordinator::store::OmaGroup::probed(
        "oma",
        vec![endpoint.clone()],
        Duration::from_millis(200),
        Duration::from_millis(200),
        Duration::from_secs(300),
    );
    let _: Changed = api
        .call("PUT", "/v1/groups/oma", Some(&g))
        .await
        .expect("put group");
    endpoint
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

/// The `[coordinator]` section for agent `id` of the coordinator at `control` whose PKI is in
/// `dir/pki` (certificate issued into `dir/id`; state in `dir/id/state`).
pub fn agent_section(control: std::net::SocketAddr, dir: &Path, id: &str, labels: &str) -> String {
    let files = tunnelfleet_coordinator::pki::issue_agent(&dir.join("pki"), id, 1, &dir.join(id))
        .expect("issue agent");
    format!(
        "[coordinator]\naddress = \"{control}\"\nserver_name = \"localhost\"\nagent_id = \"{id}\"\nlabels = {{ {labels} }}\n\
         ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n",
        files.ca.display(),
        files.cert.display(),
        files.key.display(),
        dir.join(id).join("state").display()
    )
}

/// Stores `spec` and assigns it to the agents labelled `site = site`; returns the new fleet
/// version (not pushed yet: the caller pushes when it wants).
pub async fn assign_to_site(
    fleet: &tunnelfleet_coordinator::fleet::Fleet,
    spec: &tunnelfleet_protocol::ProfileSpec,
    site: &str,
) -> u64 {
    use tunnelfleet_coordinator::store::{Assignment, Selector};
    fleet.store.put_profile(spec).await.expect("put profile");
    fleet
        .store
        .assign(&Assignment {
            profile: spec.name.clone(),
            selector: Selector::Labels([("site".to_string(), site.to_string())].into()),
        })
        .await
        .expect("assign")
}

/// A valid profile as the coordinator holds it (tests and benchmarks), forwarding `forwards`.
pub fn profile_spec(name: &str, forwards: &[&str]) -> tunnelfleet_protocol::ProfileSpec {
    let mut p = tunnelfleet_protocol::ProfileSpec::new(name, "vma", "/etc/tunnelfleet/id");
    p.endpoints = vec!["oma-a:443".into(), "oma-b:443".into()];
    p.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
    p.forwards = forwards.iter().map(|f| f.to_string()).collect();
    p
}

/// A coordinator of another protocol version (a newer release in the middle of an upgrade), on
/// 127.0.0.1:`port` with the fleet's PKI: it takes each agent's hello and turns it away, by
/// turns with a `Refused` naming the version mismatch (its own check) and with a `Welcome`
/// for its own version (so the agent's check refuses). Records every hello it was sent.
pub struct OtherVersionCoordinator {
    hellos: Arc<std::sync::Mutex<Vec<tunnelfleet_protocol::Hello>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl OtherVersionCoordinator {
    /// Starts it; it speaks [`tunnelfleet_protocol::PROTOCOL_VERSION`] + 1.
    pub async fn start(pki_dir: &Path, port: u16) -> OtherVersionCoordinator {
        use tunnelfleet_protocol::{
            AgentMessage, CoordinatorMessage, PROTOCOL_VERSION, VersionMismatch, Welcome, encode,
        };
        let endpoint = quic_server(pki_dir, port).await;
        let hellos = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (seen, s) = (hellos.clone(), stop.clone());
        let ours = PROTOCOL_VERSION + 1;
        let task = tokio::spawn(async move {
            let mut turn = 0u32;
            loop {
                let incoming = tokio::select! {
                    _ = s.cancelled() => break,
                    i = endpoint.accept() => match i { Some(i) => i, None => break },
                };
                turn += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let mut reader = tunnelfleet_runtime::frames::FrameReader::new();
                    let Ok(Some(AgentMessage::Hello(hello))) = reader.next(&mut recv).await else {
                        return;
                    };
                    let theirs = hello.protocol;
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(hello);
                    let answer = if turn % 2 == 1 {
                        // What a newer coordinator's own check says.
                        let reason = VersionMismatch { ours, theirs }.to_string();
                        CoordinatorMessage::Refused { reason }
                    } else {
                        CoordinatorMessage::Welcome(Welcome {
                            protocol: ours,
                            heartbeat_interval_ms: 500,
                            coordinator_version: "99.0.0".into(),
                            ssh_host_ca: None,
                        })
                    };
                    if let Ok(frame) = encode(&answer) {
                        let _ = send.write_all(&frame).await;
                        let _ = send.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                    }
                    conn.close(1u32.into(), b"other version");
                });
            }
            endpoint.close(0u32.into(), b"stopped");
            endpoint.wait_idle().await;
        });
        OtherVersionCoordinator { hellos, stop, task }
    }

    /// The hellos it was sent so far.
    pub fn hellos(&self) -> Vec<tunnelfleet_protocol::Hello> {
        self.hellos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops it and releases its port.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
