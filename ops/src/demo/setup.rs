//! The demo's cast: keys, agents and their profiles.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use russh::keys::PrivateKey;
use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_protocol::ProfileSpec;

use tunnelfleet_standins::embedded_oma::EmbeddedOma;

/// Starts appliance `i` (`vma-i`) with its own certificate, control socket and state dir.
pub(super) async fn start_agent(
    dir: &Path,
    pki_dir: &Path,
    coordinator: SocketAddr,
    i: usize,
    ports: [u16; 4],
) -> anyhow::Result<DemoAgent> {
    let id = format!("vma-{i}");
    let home = dir.join(&id);
    let files = tunnelfleet_coordinator::pki::issue_agent(pki_dir, &id, 1, &home.join("tls"))?;
    let socket = home.join("agent.sock");
    let config = format!(
        r#"[agent]
control_socket = "{socket}"
drain_timeout = "1s"

[coordinator]
address = "{coordinator}"
server_name = "localhost"
agent_id = "{id}"
labels = {{ site = "demo" }}
ca = "{ca}"
cert = "{cert}"
key = "{key}"
state_dir = "{state}"
reconnect_min = "100ms"
reconnect_max = "1s"
"#,
        socket = socket.display(),
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        state = home.join("state").display(),
    );
    let cfg_path = home.join("agent.toml");
    std::fs::write(&cfg_path, &config)?;
    let cfg = AgentConfig::load(&cfg_path)?;
    let agent = tunnelfleet_agent::agent::Agent::prepare(&cfg).await?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    Ok(DemoAgent {
        id,
        socket,
        ports,
        stop,
        task,
    })
}

/// The seed's tunnel set for appliance `a`, plus `extra` forwards, as the coordinator holds it.
pub(super) fn profile(
    a: &DemoAgent,
    key: &Path,
    primary: &EmbeddedOma,
    standby: &EmbeddedOma,
    vma_api: u16,
    extra: &[String],
) -> anyhow::Result<ProfileSpec> {
    let [l_api, l_nbd, l_alt, r_vma] = a.ports;
    let mut forwards = vec![
        format!("L {l_api}:localhost:{OMA_API}"),
        format!("L {l_nbd}:localhost:{OMA_NBD}"),
        format!("L {l_alt}:localhost:{OMA_NBD}"),
        format!("R {r_vma}:localhost:{vma_api}"),
    ];
    forwards.extend(extra.iter().cloned());
    let toml = format!(
        r#"[agent]
control_socket = "/unused"

[[profile]]
name = "{name}"
description = "VMA to OMA: API, NBD, alternate NBD, reverse VMA API"
endpoints = ["127.0.0.1:{p1}", "127.0.0.1:{p2}"]
user = "vma"
identity_file = "{key}"
host_key_fingerprints = ["{f1}", "{f2}"]
forwards = [{fw}]
connect_timeout = "2s"
keepalive_interval = "1s"
keepalive_count = 3
reconnect_min = "100ms"
reconnect_max = "1s"
failover_after = 2

[profile.health]
http = "http://127.0.0.1:{l_api}/health"
interval = "500ms"
timeout = "1s"
threshold = 3
"#,
        name = a.id,
        p1 = primary.port,
        p2 = standby.port,
        key = key.display(),
        f1 = primary.fingerprint,
        f2 = standby.fingerprint,
        fw = forwards
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    // The same validation `tunnelfleet profiles apply -f` runs; then the endpoints come from
    // the group, active one first.
    let cfg = AgentConfig::parse(&toml, Path::new(&format!("{}.toml", a.id)))?;
    let mut spec = cfg.profiles[0].clone();
    spec.group = Some("oma".into());
    spec.endpoints.clear();
    Ok(spec)
}

pub(super) fn write_private(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    let pem = key.to_openssh(russh::keys::ssh_key::LineEnding::LF)?;
    write_secret(path, pem.as_bytes())
}

/// Writes a new file readable by its owner only.
pub(super) fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    tunnelfleet_runtime::secret::write_atomic(path, bytes, 0o600)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// The seed's virtual OMA ports.
pub(super) const OMA_API: u16 = 8082;

pub(super) const OMA_NBD: u16 = 10809;

/// Appliances in the demo fleet.
pub(super) const AGENTS: usize = 3;

/// The demo's stable period before failback (the default is 5 minutes).
pub(super) const FAILBACK_AFTER: Duration = Duration::from_secs(3);

/// How long stopping everything may take (the agents' drain is 1 s, an OMA's stop 5 s).
pub(super) const STOP_WITHIN: Duration = Duration::from_secs(30);

/// One appliance: its agent task and the local ports of the seed's forwards.
pub(super) struct DemoAgent {
    pub(super) id: String,
    pub(super) socket: PathBuf,
    /// L api, L nbd, L alternate nbd, R vma api.
    pub(super) ports: [u16; 4],
    pub(super) stop: CancellationToken,
    pub(super) task: tokio::task::JoinHandle<()>,
}
