//! `run`: the whole coordinator as one call — config, control link, sweeper, admin API.
//!
//! The binary and the tests call the same function with a config and a shutdown token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tunnelfleet_runtime::memory::{RELEASE_EVERY, release_periodically};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::fleet::{Fleet, FleetEvent};
use crate::hooks::{Hook, HookConfig, Outbox};
use crate::link::{self, LinkContext};
use crate::metrics::Metrics;
use crate::monitor::AlertRules;
use crate::store::Store;
use crate::tls;

/// The coordinator's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// QUIC control link address (agents dial it).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Admin HTTP API address (loopback unless told otherwise).
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    /// Serve the admin API over TLS with the coordinator's certificate from `pki_dir` (the
    /// CLI: `--coordinator https://NAME:PORT --ca-file ca.pem`). Needed for an `admin_listen`
    /// other than loopback, since the bearer token must not cross a network in clear.
    #[serde(default)]
    pub admin_tls: bool,
    /// Accept a non-loopback `admin_listen` without `admin_tls`: its bearer token then crosses
    /// that network in clear. Off: use `admin_tls`, or a TLS proxy on this host.
    #[serde(default)]
    pub admin_plaintext_on_network: bool,
    /// This coordinator's name among those sharing an etcd store (default: the host name).
    #[serde(default)]
    pub name: Option<String>,
    /// PKI directory from `tunnelfleet pki init`.
    pub pki_dir: PathBuf,
    /// Where the fleet state is: `sled` (embedded, in `state_dir`; the default) or `etcd`
    /// (the `[etcd]` section; several coordinators share it).
    #[serde(default)]
    pub store: StoreKind,
    /// sled state directory (with `store = "sled"`).
    #[serde(default)]
    pub state_dir: PathBuf,
    /// The etcd cluster (with `store = "etcd"`).
    #[serde(default)]
    pub etcd: Option<crate::store::EtcdConfig>,
    /// File holding the admin bearer token (refused when group or others can read it).
    pub admin_token_file: PathBuf,
    /// Heartbeat interval told to agents.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long an agent's SSH certificate is valid (renewed at half-life): long enough for
    /// an agent to log in to its OMAs while this coordinator is away.
    #[serde(default = "default_ssh_cert_validity", with = "humantime_serde")]
    pub ssh_cert_validity: Duration,
    /// Alert thresholds.
    #[serde(default)]
    pub alerts: AlertRules,
    /// Where alerts go (`[[hook]]`).
    #[serde(default, rename = "hook")]
    pub hooks: Vec<HookConfig>,
    /// Prometheus `/metrics` (no authentication, read-only); off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The fleet page (`http://ADDRESS/`, signed in with an admin token); off when absent.
    /// The same rules as `admin_listen`: TLS with `admin_tls`, and off loopback only with it
    /// (or `admin_plaintext_on_network`).
    #[serde(default)]
    pub web_listen: Option<SocketAddr>,
    /// UDP receive and send buffer of the control link, bytes (capped by the kernel's
    /// `net.core.rmem_max` / `wmem_max`; a warning says when the cap grants less).
    #[serde(default = "default_udp_buffer")]
    pub udp_buffer: usize,
}

/// The store engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded sled in `state_dir`: one coordinator, nothing to install.
    #[default]
    Sled,
    /// etcd (`[etcd]`): several coordinators on one fleet state.
    Etcd,
}

/// Why the coordinator cannot start: each names the setting, file or address at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is refused: its key and why.
    #[error("{key}: {reason}")]
    Setting {
        /// The key (`admin_listen`, `hook "ops"`, …).
        key: String,
        /// Why.
        reason: String,
    },
    /// A file could not be read.
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The file system's reason.
        error: std::io::Error,
    },
    /// The config file is not a valid config.
    #[error("{}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's reason (key and line).
        reason: String,
    },
    /// A listener could not be bound.
    #[error("{what}: cannot listen on {addr}: {error}")]
    Listen {
        /// Which listener (`control link`, `admin API`, …).
        what: &'static str,
        /// The address, with its protocol.
        addr: String,
        /// The kernel's reason.
        error: std::io::Error,
    },
    /// The admin token file is readable by others.
    #[error("admin token: {0}")]
    AdminToken(tunnelfleet_runtime::secret::SecretFileError),
    /// A hook's settings are refused.
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookConfigError),
    /// The PKI directory's certificates or keys.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The fleet CA.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// An SSH CA.
    #[error(transparent)]
    SshCa(#[from] crate::sshca::SshCaError),
    /// The admin API's certificate (`admin_tls`).
    #[error("admin_tls: {0}")]
    AdminTls(tls::TlsError),
    /// The state store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Registering with the other coordinators.
    #[error("joining the coordinators: {0}")]
    Join(crate::store::StoreError),
}

fn setting(key: &str, reason: impl Into<String>) -> StartError {
    StartError::Setting {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// A TCP listener on `addr`, or why not (naming `what` and the address).
async fn bind_tcp(
    what: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| StartError::Listen {
            what,
            addr: format!("tcp {addr}"),
            error,
        })
}

/// Opens the store the config names; the error says which setting is wrong.
pub async fn open_store(cfg: &CoordinatorConfig) -> Result<Store, StartError> {
    match cfg.store {
        StoreKind::Sled => {
            if cfg.state_dir.as_os_str().is_empty() {
                return Err(setting(
                    "state_dir",
                    "required with store = \"sled\" (the default)",
                ));
            }
            Ok(Store::open(&cfg.state_dir)?)
        }
        StoreKind::Etcd => {
            let Some(etcd) = &cfg.etcd else {
                return Err(setting(
                    "store = \"etcd\"",
                    "needs an [etcd] section with endpoints = [\"https://…:2379\", …]",
                ));
            };
            if etcd.endpoints.is_empty() {
                return Err(setting("etcd.endpoints", "names no etcd member"));
            }
            Ok(Store::open_etcd(etcd).await?)
        }
    }
}

/// The host's name (the default coordinator name).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coordinator".into())
}

fn default_udp_buffer() -> usize {
    crate::udp::DEFAULT_BUFFER
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4433))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4480))
}
fn default_ssh_cert_validity() -> Duration {
    crate::sshca::DEFAULT_VALIDITY
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}

impl CoordinatorConfig {
    /// Reads and parses a config file; the error names the file.
    pub fn load(path: &Path) -> Result<Self, StartError> {
        let text = std::fs::read_to_string(path).map_err(|error| StartError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Self, StartError> {
        toml::from_str(text).map_err(|e| StartError::Parse {
            path: file.to_path_buf(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })
    }
}

/// What `bind` produced: the addresses actually bound (port 0 resolved).
pub struct Bound {
    /// Control link address.
    pub control: SocketAddr,
    /// Admin API address.
    pub admin: SocketAddr,
    /// The `/metrics` address, when enabled.
    pub metrics: Option<SocketAddr>,
    /// The fleet page's address, when enabled.
    pub web: Option<SocketAddr>,
    web_listener: Option<tokio::net::TcpListener>,
    /// The shared fleet state.
    pub fleet: Arc<Fleet>,
    metrics_listener: Option<tokio::net::TcpListener>,
    endpoint: quinn::Endpoint,
    admin_listener: tokio::net::TcpListener,
    admin_tls: Option<tokio_rustls::TlsAcceptor>,
    token: String,
    outbox: Arc<Outbox>,
    rules: AlertRules,
    fleet_events: tokio::sync::mpsc::UnboundedReceiver<FleetEvent>,
    link: LinkContext,
    membership: crate::store::Membership,
    /// This coordinator's name.
    name: String,
    /// Spread agents over the coordinators ([`crate::balance`]; etcd's `rebalance`).
    rebalance: bool,
    /// Ends the membership (the lease revoked) once the leader's work has stopped.
    membership_stop: CancellationToken,
}

/// Everything that can fail before serving: token, PKI, store, sockets.
pub async fn bind(cfg: &CoordinatorConfig) -> Result<Bound, StartError> {
    if !cfg.admin_listen.ip().is_loopback() && !cfg.admin_tls && !cfg.admin_plaintext_on_network {
        return Err(setting(
            "admin_listen",
            format!(
                "{} is not loopback, and the admin API is plain HTTP: its bearer token would cross the network in clear. Set admin_tls = true (the coordinator's certificate from pki_dir), or keep it on 127.0.0.1, or set admin_plaintext_on_network = true to accept that",
                cfg.admin_listen
            ),
        ));
    }
    if let Some(web) = cfg.web_listen
        && !web.ip().is_loopback()
        && !cfg.admin_tls
        && !cfg.admin_plaintext_on_network
    {
        return Err(setting(
            "web_listen",
            format!(
                "{web} is not loopback, and the fleet page is plain HTTP: the admin token it signs in with would cross the network in clear. Set admin_tls = true (the page is then served over TLS too), or keep it on 127.0.0.1, or set admin_plaintext_on_network = true to accept that"
            ),
        ));
    }
    tunnelfleet_runtime::secret::check_permissions(&cfg.admin_token_file)
        .map_err(StartError::AdminToken)?;
    let token = std::fs::read_to_string(&cfg.admin_token_file)
        .map_err(|error| StartError::Read {
            path: cfg.admin_token_file.clone(),
            error,
        })?
        .trim()
        .to_string();
    if token.len() < 16 {
        return Err(setting(
            &cfg.admin_token_file.display().to_string(),
            "the admin token must be at least 16 characters",
        ));
    }
    if cfg.udp_buffer < crate::udp::MIN_BUFFER {
        return Err(setting(
            "udp_buffer",
            format!(
                "{} bytes is too small; at least {} (default {})",
                cfg.udp_buffer,
                crate::udp::MIN_BUFFER,
                crate::udp::DEFAULT_BUFFER
            ),
        ));
    }
    if cfg.alerts.threshold == 0 {
        return Err(setting("alerts.threshold", "must be at least 1"));
    }
    let mut hooks = Vec::new();
    for h in &cfg.hooks {
        if hooks.iter().any(|x: &Hook| x.name == h.name) {
            return Err(setting(&format!("hook {:?}", h.name), "name used twice"));
        }
        hooks.push(Hook::from_config(h)?);
    }
    let server = tls::server_config(&cfg.pki_dir)?;
    let signer = crate::pki::Signer::load(&cfg.pki_dir)?;
    if signer.is_none() {
        tracing::info!(pki = %cfg.pki_dir.display(), "no CA key in the PKI directory: agents cannot enroll with join tokens here");
    }
    let ssh_ca = crate::sshca::SshCa::load(&cfg.pki_dir, crate::sshca::CaKind::User)?;
    let ssh_host_ca = crate::sshca::SshCa::load(&cfg.pki_dir, crate::sshca::CaKind::Host)?;
    if let Some(ca) = &ssh_host_ca {
        tracing::info!(fingerprint = %ca.fingerprint(), "SSH host CA loaded: OMA host keys are certified, agents learn it");
    }
    match &ssh_ca {
        Some(ca) => {
            tracing::info!(fingerprint = %ca.fingerprint(), "SSH user CA loaded: agents' SSH keys are certified")
        }
        None => {
            tracing::info!(pki = %cfg.pki_dir.display(), "no SSH user CA in the PKI directory (tunnelfleet pki ssh-ca): agents' certificate requests are refused")
        }
    }
    if cfg.ssh_cert_validity < crate::sshca::MIN_VALIDITY {
        return Err(setting(
            "ssh_cert_validity",
            format!(
                "{:?} is shorter than {:?} (agents renew at half-life, at most once every {:?})",
                cfg.ssh_cert_validity,
                crate::sshca::MIN_VALIDITY,
                crate::sshca::MIN_REQUEST_INTERVAL
            ),
        ));
    }
    let store = open_store(cfg).await?;
    let listen = |what: &'static str, addr: String| {
        move |error: std::io::Error| StartError::Listen { what, addr, error }
    };
    let udp = crate::udp::bind(cfg.listen, cfg.udp_buffer)
        .map_err(listen("control link", format!("udp {}", cfg.listen)))?;
    if udp.recv_buffer < cfg.udp_buffer || udp.send_buffer < cfg.udp_buffer {
        tracing::warn!(
            wanted = cfg.udp_buffer,
            recv = udp.recv_buffer,
            send = udp.send_buffer,
            "control link: the kernel granted smaller UDP buffers than udp_buffer; with many agents, packets will be dropped in bursts: raise net.core.rmem_max and net.core.wmem_max (sysctl)"
        );
    }
    let endpoint = crate::udp::endpoint(udp.socket, Some(server))
        .map_err(listen("control link", format!("udp {}", cfg.listen)))?;
    let admin_tls = if cfg.admin_tls {
        Some(crate::admin_tls::acceptor(&cfg.pki_dir).map_err(StartError::AdminTls)?)
    } else {
        None
    };
    let admin_listener = bind_tcp("admin API", cfg.admin_listen).await?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(bind_tcp("metrics", a).await?),
        None => None,
    };
    let web_listener = match cfg.web_listen {
        Some(a) => Some(bind_tcp("web_listen", a).await?),
        None => None,
    };
    let (fleet, fleet_events) = Fleet::new(store.clone(), cfg.heartbeat_interval);
    let control = endpoint
        .local_addr()
        .map_err(listen("control link", format!("udp {}", cfg.listen)))?;
    let admin = admin_listener
        .local_addr()
        .map_err(listen("admin API", format!("tcp {}", cfg.admin_listen)))?;
    let web = web_listener.as_ref().and_then(|l| l.local_addr().ok());
    let name = cfg.name.clone().unwrap_or_else(host_name);
    let me = crate::store::CoordinatorRecord {
        name: name.clone(),
        control: control.to_string(),
        admin: admin.to_string(),
        web: web.map(|w| w.to_string()),
        started_unix_ms: tunnelfleet_runtime::clock::now_unix_ms(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let ttl = cfg
        .etcd
        .as_ref()
        .map_or(Duration::from_secs(3), |e| e.lease_ttl);
    let membership_stop = CancellationToken::new();
    let membership = store
        .join(me, ttl, membership_stop.clone())
        .await
        .map_err(StartError::Join)?;
    let metrics = match Metrics::new() {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            tracing::error!("{e}; /metrics disabled");
            None
        }
    };
    Ok(Bound {
        control,
        admin,
        metrics: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
        metrics_listener,
        web,
        web_listener,
        outbox: Outbox::new(membership.leader_store(), hooks),
        membership,
        name,
        rebalance: cfg.etcd.as_ref().is_some_and(|e| e.rebalance),
        membership_stop,
        rules: cfg.alerts.clone(),
        fleet,
        fleet_events,
        link: LinkContext {
            signer: signer.map(Arc::new),
            metrics,
            ssh_ca: ssh_ca.map(Arc::new),
            ssh_cert_validity: cfg.ssh_cert_validity,
            ssh_host_ca: ssh_host_ca.map(Arc::new),
        },
        endpoint,
        admin_listener,
        admin_tls,
        token,
    })
}

impl Bound {
    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(control = %self.control, admin = %self.admin, "coordinator running");
        let metrics = self.link.metrics.clone();
        let watch = crate::watch::WatchHandle::new(self.outbox.clone(), &self.name);
        if let Some(m) = &metrics {
            crate::gauges::observe(
                m,
                Arc::downgrade(&self.fleet),
                watch.clone(),
                self.membership.subscribe(),
            );
        }
        let leader_store = self.membership.leader_store();
        let rollouts = crate::rollout::Rollouts::new(
            self.fleet.clone(),
            &self.name,
            leader_store.clone(),
            self.outbox,
        );
        let leader = tokio::spawn(crate::lead::run(
            crate::lead::LeaderWork {
                fleet: self.fleet.clone(),
                store: leader_store,
                fleet_events: self.fleet_events,
                rules: self.rules,
                metrics: metrics.clone(),
                handle: watch.clone(),
                rollouts: rollouts.clone(),
            },
            self.membership.subscribe(),
            shutdown.clone(),
        ));
        let follower = self.fleet.store.shared().then(|| {
            let versions = tokio::spawn(crate::lead::follow_versions(
                self.fleet.clone(),
                Duration::from_millis(10),
                shutdown.clone(),
            ));
            let evidence = tokio::spawn(crate::lead::publish_evidence(
                self.fleet.clone(),
                self.name.clone(),
                Duration::from_millis(500),
                shutdown.clone(),
            ));
            let balance = self.rebalance.then(|| {
                tokio::spawn(crate::balance::run(
                    self.fleet.clone(),
                    self.name.clone(),
                    shutdown.clone(),
                ))
            });
            (versions, evidence, balance)
        });
        let state = Admin {
            fleet: self.fleet.clone(),
            rollouts,
            watch,
            enrollment: self.link.signer.is_some(),
            ssh_ca_public: self.link.ssh_ca.as_ref().map(|c| Arc::new(c.public_line())),
            ssh_host_ca: self.link.ssh_host_ca.clone(),
            token: Arc::new(self.token),
            name: Arc::new(self.name),
            standing: self.membership.subscribe(),
        };
        let web = self.web_listener.map(|l| {
            tokio::spawn(tunnelfleet_runtime::serve::serve(
                "fleet page",
                l,
                self.admin_tls.clone(),
                crate::web::router(state.clone()),
                tunnelfleet_runtime::serve::Limits::ADMIN,
                shutdown.clone(),
            ))
        });
        let app = admin::router(state);
        let serve = tokio::spawn(link::serve(
            self.endpoint,
            self.fleet.clone(),
            self.link,
            shutdown.clone(),
        ));
        let sweeper = tokio::spawn(self.fleet.clone().run_sweeper(shutdown.clone()));
        let trim = tokio::spawn(release_periodically(RELEASE_EVERY, shutdown.clone()));
        let api = tokio::spawn(tunnelfleet_runtime::serve::serve(
            "admin API",
            self.admin_listener,
            self.admin_tls,
            app,
            tunnelfleet_runtime::serve::Limits::ADMIN,
            shutdown.clone(),
        ));
        let metrics = self.metrics_listener.map(|l| {
            tokio::spawn(tunnelfleet_runtime::serve::serve(
                "metrics",
                l,
                None,
                admin::metrics_router(metrics.clone()),
                tunnelfleet_runtime::serve::Limits::METRICS,
                shutdown.clone(),
            ))
        });
        tunnelfleet_runtime::systemd::ready(&format!(
            "control link {}, admin API {}",
            self.control, self.admin
        ));
        let watchdog = tunnelfleet_runtime::systemd::spawn_watchdog(shutdown.clone());
        shutdown.cancelled().await;
        tunnelfleet_runtime::systemd::stopping();
        if let Some(w) = watchdog {
            let _ = w.await;
        }
        if let Some(m) = metrics {
            let _ = m.await;
        }
        if let Some(w) = web {
            let _ = w.await;
        }
        let _ = serve.await;
        let _ = sweeper.await;
        let _ = trim.await;
        let _ = api.await;
        let _ = leader.await;
        if let Some((versions, evidence, balance)) = follower {
            let _ = versions.await;
            let _ = evidence.await;
            if let Some(b) = balance {
                let _ = b.await;
            }
        }
        // The lead is given up only once nothing decides here any more.
        self.membership_stop.cancel();
        self.membership.stopped().await;
        tracing::info!("coordinator stopped");
    }
}
