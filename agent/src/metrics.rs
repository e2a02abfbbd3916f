//! Prometheus `/metrics` of one agent, built with OpenTelemetry: per profile, whether its session
//! is up, reconnects, failovers, session errors by endpoint and kind, health checks and the last
//! check's latency; per forward, bytes each way and connections.
//!
//! Every value comes from one status snapshot taken when Prometheus scrapes, so the numbers on a
//! page agree with each other and with `tunnelfleet tunnels status`, and nothing is counted
//! twice. Off unless `agent.metrics_listen` is set; served on its own listener without
//! authentication (it is read-only and carries no secrets), on loopback unless told otherwise.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnelfleet_protocol::ErrorKind;
use tunnelfleet_runtime::metrics::{ExportError, Exporter};

use crate::status::{AgentStatus, ForwardState, ProfileStatus, TunnelState};
use crate::supervisor::SupervisorHandle;

/// Why metrics could not be set up or rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `agent.metrics_listen` could not be bound (in use, not an address of this host).
    #[error("agent.metrics_listen {addr}: cannot listen: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The exporter could not be built or the registry not encoded.
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// The status snapshot the instruments read while one scrape is rendered.
type Snapshot = Arc<Mutex<Option<AgentStatus>>>;

/// The agent's instruments, read from the status snapshot of the scrape in progress.
#[derive(Debug)]
pub struct Metrics {
    exporter: Exporter,
    snapshot: Snapshot,
    // One scrape at a time, so a concurrent scrape cannot swap the snapshot mid-render.
    scrape: tokio::sync::Mutex<()>,
}

impl Metrics {
    /// Instruments on a fresh registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let exporter = Exporter::new()?;
        let snapshot: Snapshot = Arc::default();
        register(&exporter.meter("tunnelfleet-agent"), &snapshot);
        Ok(Metrics {
            exporter,
            snapshot,
            scrape: tokio::sync::Mutex::new(()),
        })
    }

    /// The Prometheus text exposition of `status`.
    pub async fn render(&self, status: AgentStatus) -> Result<String, MetricsError> {
        let _one = self.scrape.lock().await;
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
        let text = self.exporter.render();
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(text?)
    }
}

/// Binds `agent.metrics_listen` (at start, so a port conflict refuses the config).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    agent: SupervisorHandle,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new((metrics, agent)));
    tunnelfleet_runtime::serve::serve(
        "metrics",
        listener,
        None,
        app,
        tunnelfleet_runtime::serve::Limits::METRICS,
        stop,
    )
    .await;
}

async fn scrape(State(state): State<Arc<(Metrics, SupervisorHandle)>>) -> Response {
    let (metrics, agent) = &*state;
    let Some(status) = agent.status().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n").into_response();
    };
    match metrics.render(status).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Calls `f` with every profile of the snapshot being rendered.
fn each_profile(snapshot: &Snapshot, mut f: impl FnMut(&ProfileStatus)) {
    let guard = snapshot.lock().unwrap_or_else(|p| p.into_inner());
    for p in guard.iter().flat_map(|s| &s.profiles) {
        f(p);
    }
}

fn profile(p: &ProfileStatus) -> KeyValue {
    KeyValue::new("profile", p.name.clone())
}

fn forward(p: &ProfileStatus, spec: &str) -> [KeyValue; 2] {
    [profile(p), KeyValue::new("forward", spec.to_string())]
}

fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Connect => "connect",
        ErrorKind::Timeout => "timeout",
        ErrorKind::HostKey => "host_key",
        ErrorKind::Auth => "auth",
        ErrorKind::SessionLost => "session_lost",
        ErrorKind::Ssh => "ssh",
        ErrorKind::Jump => "jump",
    }
}

/// The observable instruments, each reading the snapshot.
fn register(meter: &Meter, snapshot: &Snapshot) {
    let s = snapshot.clone();
    let _ = meter
        .i64_observable_gauge("tunnelfleet_agent_tunnel_up")
        .with_description(
            "1 when the profile's SSH session is up, else 0; labelled with the endpoint in use",
        )
        .with_callback(move |o| {
            each_profile(&s, |p| {
                o.observe(
                    i64::from(p.state == TunnelState::Up),
                    &[
                        profile(p),
                        KeyValue::new("endpoint", p.active_endpoint.clone()),
                    ],
                );
            });
        })
        .build();
    let s = snapshot.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_agent_reconnects")
        .with_description("Sessions re-established after the first, per profile")
        .with_callback(move |o| each_profile(&s, |p| o.observe(p.reconnects, &[profile(p)])))
        .build();
    let s = snapshot.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_agent_failovers")
        .with_description("Moves to another endpoint of the profile")
        .with_callback(move |o| each_profile(&s, |p| o.observe(p.failovers, &[profile(p)])))
        .build();
    let s = snapshot.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_agent_session_errors")
        .with_description("Session failures by endpoint and kind (connect, timeout, host_key, auth, session_lost, ssh, jump)")
        .with_callback(move |o| {
            each_profile(&s, |p| {
                for e in &p.errors {
                    o.observe(
                        e.count,
                        &[
                            profile(p),
                            KeyValue::new("endpoint", e.endpoint.clone()),
                            KeyValue::new("kind", kind_label(e.kind)),
                        ],
                    );
                }
            });
        })
        .build();
    // Per profile with a health check: (name, description, counter or gauge, value).
    type HealthValue = fn(&crate::status::HealthStatus) -> u64;
    let health: [(&'static str, &'static str, bool, HealthValue); 3] = [
        (
            "tunnelfleet_agent_health_checks",
            "Health checks run, per profile",
            true,
            |h| h.checks,
        ),
        (
            "tunnelfleet_agent_health_failures",
            "Health checks failed, per profile",
            true,
            |h| h.failures,
        ),
        (
            "tunnelfleet_agent_health_consecutive_failures",
            "Health checks failed in a row (the profile is down at its threshold)",
            false,
            |h| u64::from(h.consecutive_failures),
        ),
    ];
    for (name, description, counter, value) in health {
        let s = snapshot.clone();
        let callback = move |o: &dyn opentelemetry::metrics::AsyncInstrument<u64>| {
            each_profile(&s, |p| {
                if let Some(h) = &p.health {
                    o.observe(value(h), &[profile(p)]);
                }
            });
        };
        if counter {
            let _ = meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(callback)
                .build();
        } else {
            let _ = meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(callback)
                .build();
        }
    }
    let s = snapshot.clone();
    let _ = meter
        .f64_observable_gauge("tunnelfleet_agent_health_latency")
        .with_description("The last health check's latency, pass or fail")
        .with_unit("s")
        .with_callback(move |o| {
            each_profile(&s, |p| {
                if let Some(last) = p.health.as_ref().and_then(|h| h.last.as_ref()) {
                    o.observe(last.latency_ms / 1000.0, &[profile(p)]);
                }
            });
        })
        .build();
    let s = snapshot.clone();
    let _ = meter
        .i64_observable_gauge("tunnelfleet_agent_forward_up")
        .with_description("1 when the forward is serving (listener bound and session up, or remote forward granted), else 0")
        .with_callback(move |o| {
            each_profile(&s, |p| {
                for f in &p.forwards {
                    o.observe(
                        i64::from(f.state == ForwardState::Active),
                        &forward(p, &f.spec),
                    );
                }
            });
        })
        .build();
    let s = snapshot.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_agent_forward")
        .with_description(
            "Bytes carried by each forward: out = from the local side into the tunnel, in = back",
        )
        .with_unit("By")
        .with_callback(move |o| {
            each_profile(&s, |p| {
                for f in &p.forwards {
                    let [a, b] = forward(p, &f.spec);
                    o.observe(
                        f.bytes_out,
                        &[a.clone(), b.clone(), KeyValue::new("direction", "out")],
                    );
                    o.observe(f.bytes_in, &[a, b, KeyValue::new("direction", "in")]);
                }
            });
        })
        .build();
    let s = snapshot.clone();
    let _ = meter
        .u64_observable_gauge("tunnelfleet_agent_forward_connections_open")
        .with_description("Connections open through each forward")
        .with_callback(move |o| {
            each_profile(&s, |p| {
                for f in &p.forwards {
                    o.observe(f.connections_open, &forward(p, &f.spec));
                }
            });
        })
        .build();
    let s = snapshot.clone();
    let _ = meter
        .u64_observable_gauge("tunnelfleet_agent_forward_connections_opening")
        .with_description(
            "Connections of each forward waiting for the server to open their channel",
        )
        .with_callback(move |o| {
            each_profile(&s, |p| {
                for f in &p.forwards {
                    o.observe(f.connections_opening, &forward(p, &f.spec));
                }
            });
        })
        .build();
    let s = snapshot.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_agent_forward_connections")
        .with_description("Connections accepted by each forward")
        .with_callback(move |o| {
            each_profile(&s, |p| {
                for f in &p.forwards {
                    o.observe(f.connections_total, &forward(p, &f.spec));
                }
            });
        })
        .build();
}
