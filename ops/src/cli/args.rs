//! The `tunnelfleet` argument tree (clap): every command, subcommand and flag, and nothing that
//! runs them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Operate tunnelfleet: the fleet (through the coordinator), the local agent's tunnels, and the demo.
#[derive(Parser, Debug)]
#[command(
    name = "tunnelfleet",
    version,
    about,
    after_help = "Examples:\n  tunnelfleet demo\n  tunnelfleet tunnels status\n  tunnelfleet tunnels restart oma --socket /run/tunnelfleet/agent.sock\n  tunnelfleet tunnels list --json | jq '.profiles[].name'\n  tunnelfleet watch\n  tunnelfleet profiles diff -f profiles.toml && tunnelfleet profiles apply -f profiles.toml\n  tunnelfleet oma failover oma-dc1\n  tunnelfleet token create --label site=dc1 --ttl 1h\n  tunnelfleet completions bash > /etc/bash_completion.d/tunnelfleet\n\nExit codes: 0 ok, 1 failure (or a failed check), 2 changes pending (profiles diff --detailed-exitcode), 3 agent or coordinator unreachable."
)]
pub(super) struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub(super) json: bool,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand, Debug)]
pub(super) enum Command {
    /// An agent's tunnels: the local one through its control socket, any other with
    /// --agent ID through the coordinator.
    Tunnels {
        /// Act on this agent through the coordinator instead of the local agent.
        #[arg(long, global = true)]
        agent: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
        /// Agent control socket.
        #[arg(long, env = "TUNNELFLEET_SOCKET", global = true)]
        socket: Option<PathBuf>,
        /// Read the socket path from this agent config instead.
        #[arg(long, global = true, default_value = "/etc/tunnelfleet/agent.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: TunnelAction,
    },
    /// Network checks: DNS, latency, TCP ports, SSH banners; bandwidth through a tunnel.
    Net {
        #[command(subcommand)]
        action: NetAction,
    },
    /// Security audit: SSH keys, sshd settings, listening sockets, failed logins, and
    /// tunnelfleet's own config. Exit 1 when a finding reaches --fail-on.
    Audit {
        #[command(flatten)]
        opts: crate::audit::AuditOptions,
        /// Audit this agent's host through the coordinator (with its default options).
        #[arg(long, conflicts_with = "all")]
        agent: Option<String>,
        /// Audit every connected agent's host through the coordinator.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        api: ApiArgs,
        /// Exit 1 when a finding is at least this severe.
        #[arg(long, value_enum, default_value_t = crate::audit::Severity::High)]
        fail_on: crate::audit::Severity,
    },
    /// Fleet agents, through the coordinator's admin API.
    Agents {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: AgentsAction,
    },
    /// Fleet profiles, through the coordinator's admin API.
    Profiles {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: ProfilesAction,
    },
    /// Assign a profile to one agent or to every agent with some labels.
    Assign {
        #[command(flatten)]
        api: ApiArgs,
        /// Profile name.
        profile: String,
        /// One agent.
        #[arg(long, conflicts_with = "labels", required_unless_present = "labels")]
        agent: Option<String>,
        /// A label the agents must have, `key=value` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// The staged rollout in progress (or the last): its stage, who failed and why, how to
    /// go on; and which agents applied the current version. Exit 1 when it halted.
    Rollout {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: Option<RolloutAction>,
    },
    /// OMA groups: endpoint health, which agents are on each, drain, failover, failback.
    Oma {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: OmaAction,
    },
    /// Alerts: list, show, ack, silence, and the state of their delivery hooks.
    Alerts {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: AlertsAction,
    },
    /// The whole fleet, refreshed in place: agents, tunnels, OMA endpoints, firing alerts.
    /// With --json, one view per line.
    Watch {
        #[command(flatten)]
        api: ApiArgs,
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Stop after this many refreshes (0 = until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// One-time join tokens that let new agents enroll themselves.
    Token {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Named admin tokens, each with a role: viewer (read), operator (drain, failover,
    /// restart tunnels, ack and silence alerts, resume and abort rollouts), admin (the rest).
    #[command(name = "admin-token")]
    AdminToken {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: AdminTokenAction,
    },
    /// Every change made through the admin API: when, which token, what, and the result.
    #[command(
        name = "audit-log",
        after_help = "Examples:\n  tunnelfleet audit-log --since 1h\n  tunnelfleet audit-log --since 30d --json | jq 'select(.status >= 400)'"
    )]
    AuditLog {
        #[command(flatten)]
        api: ApiArgs,
        /// Only entries younger than this.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// At most this many (the latest).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// The coordinators sharing the fleet state (etcd), which one leads and since when.
    Coordinators {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The fleet's certificate authority.
    Pki {
        #[command(subcommand)]
        action: PkiAction,
    },
    /// Run the whole system on this machine with nothing set up: a coordinator, an embedded OMA
    /// pair, three agents with the seed's tunnels, a pushed change, a staged rollout that
    /// halts, a silent OMA failure and a loud one. Its components' logs go to a file it names
    /// at the end.
    Demo {
        /// Show the components' logs inline instead.
        #[arg(long)]
        verbose: bool,
    },
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (roff) for tunnelfleet, tunnelfleet-agent and tunnelfleet-coordinator:
    /// one page per command and subcommand, generated from the same definitions as --help.
    Man {
        /// Directory to write the pages into (created when missing).
        #[arg(long)]
        out: PathBuf,
        /// Only this program's pages.
        #[arg(long, value_parser = ["tunnelfleet", "tunnelfleet-agent", "tunnelfleet-coordinator"])]
        program: Option<String>,
    },
    /// Edit an agent's or a coordinator's config file in place, comments kept: the result is
    /// checked as the daemon reads it and written only when it passes (atomically, owner and
    /// mode kept).
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// What `tunnelfleet config` does to a file.
#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Set keys: `coordinator.address=coord.example.net:4433 listen=0.0.0.0:4433`. A value is
    /// read as TOML when it is one (`true`, `3`, `["a", "b"]`, `"quoted"`), else as a string.
    /// An agent's file is told from a coordinator's by its tables ([agent], [coordinator],
    /// [[profile]]).
    Set {
        /// The config file.
        file: PathBuf,
        /// KEY=VALUE, KEY a dotted path of tables and the key.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
}

/// Where the coordinator's admin API is and how to authenticate.
#[derive(clap::Args, Debug)]
pub(super) struct ApiArgs {
    /// Admin API address: `host:port`, or `https://name:port` for a coordinator with
    /// `admin_tls` (with `--ca-file`); several coordinators separated by commas, tried in
    /// order until one takes the connection.
    #[arg(
        long,
        env = "TUNNELFLEET_COORDINATOR",
        default_value = "127.0.0.1:4480",
        global = true
    )]
    pub(super) coordinator: String,
    /// File holding the admin bearer token.
    #[arg(
        long,
        env = "TUNNELFLEET_TOKEN_FILE",
        default_value = "/etc/tunnelfleet/admin.token",
        global = true
    )]
    pub(super) token_file: PathBuf,
    /// The fleet CA certificate (`pki_dir/ca.pem`) an `https://` coordinator is checked against.
    #[arg(long, env = "TUNNELFLEET_CA_FILE", global = true)]
    pub(super) ca_file: Option<PathBuf>,
}

impl ApiArgs {
    pub(super) fn client(&self) -> anyhow::Result<crate::api::ApiClient> {
        let token = std::fs::read_to_string(&self.token_file).with_context(|| {
            format!("{}: cannot read the admin token", self.token_file.display())
        })?;
        let client = crate::api::ApiClient::new(&self.coordinator, &token);
        match &self.ca_file {
            Some(ca) => Ok(client.with_ca(ca)?),
            None => Ok(client),
        }
    }
}

#[derive(Subcommand, Debug)]
pub(super) enum AgentsAction {
    /// Every agent: state, labels, tunnels up, applied version.
    List,
    /// One agent with its last heartbeat.
    Show {
        /// Agent id.
        id: String,
    },
    /// Shut an agent out: its connection is closed at once and it is refused from now on,
    /// whatever certificate it holds.
    Revoke {
        /// Agent id.
        id: String,
        /// Why (kept, and shown to the agent).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let a revoked agent connect again.
    Unrevoke {
        /// Agent id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum ProfilesAction {
    /// Every profile.
    List,
    /// One profile.
    Show {
        /// Profile name.
        name: String,
    },
    /// Create or replace the profiles of a file written like an agent config's [[profile]]s
    /// (validated by the agent's own rules before anything is sent). With --canary, as one
    /// staged change: canaries first, then --waves waves, each after --wait of health; any
    /// failure halts it and puts the failed agents back on the previous version.
    #[command(
        after_help = "Examples:\n  tunnelfleet profiles apply -f oma.toml\n  tunnelfleet profiles apply -f oma.toml --canary 5 --wait 2m --waves 3\n  tunnelfleet profiles apply -f oma.toml --canary 2%"
    )]
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Stage it: this many canaries (`5`) or this share of the affected agents (`2%`).
        #[arg(long, value_parser = parse_canary)]
        canary: Option<tunnelfleet_coordinator::rollout::Canary>,
        /// How long each stage must run healthy before the next gets it.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, requires = "canary")]
        wait: Duration,
        /// Waves after the canaries.
        #[arg(long, default_value_t = 3, requires = "canary")]
        waves: u32,
        /// How long an agent of a stage may take to apply it and come up before what it is
        /// still waiting for counts as a failure.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, requires = "canary")]
        settle: Duration,
    },
    /// Delete a profile (and its assignments).
    Delete {
        /// Profile name.
        name: String,
    },
    /// What `apply -f FILE` would change, before anything is applied: profiles created or
    /// changed, forwards added and removed, whether sessions restart, which agents get it.
    #[command(
        after_help = "Exit codes: 0 success (with --detailed-exitcode: no changes), 2 with --detailed-exitcode when there are changes, 1 on errors."
    )]
    Diff {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Exit 2 when applying would change something (for CI pipelines).
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Past versions of the fleet's profiles and assignments, newest first.
    History {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Restore the profiles and assignments of an earlier version (as a new version, pushed
    /// at once).
    Rollback {
        /// The version to restore (`profiles history` lists them).
        version: u64,
    },
    /// Turn seed 004's profile file (NAME|HOST|USER|LOCAL_PORT|REMOTE_HOST|REMOTE_PORT|
    /// DESCRIPTION) or ssh/autossh command lines (scripts, unit files) into profiles: TOML on
    /// stdout (or -o), and a note on stderr for everything not carried over as it was.
    #[command(
        after_help = "Examples:\n  tunnelfleet profiles import ~/.ssh-tunnels.conf -o profiles.toml\n  tunnelfleet profiles import vma-tunnel.sh --name oma --apply\n  echo 'ssh -p 443 -L 8082:localhost:8082 vma@oma1' | tunnelfleet profiles import -"
    )]
    Import {
        /// The file, or `-` for stdin.
        file: PathBuf,
        /// Input format.
        #[arg(long, value_enum, default_value_t = crate::import::Format::Auto)]
        format: crate::import::Format,
        /// Name of the (first) ssh command line's profile; default: from its host.
        #[arg(long)]
        name: Option<String>,
        /// Identity file for profiles whose source names none.
        #[arg(long, default_value = "/etc/tunnelfleet/id_ed25519")]
        identity_file: PathBuf,
        /// known_hosts file the profiles verify host keys against.
        #[arg(long, default_value = "/etc/tunnelfleet/known_hosts")]
        known_hosts: PathBuf,
        /// Write the TOML here instead of stdout (refuses to overwrite).
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
        /// Also apply the profiles to the coordinator.
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum PkiAction {
    /// Create the CA and the coordinator's certificate (refuses to replace an existing CA).
    Init {
        /// PKI directory (keys are written 0600).
        #[arg(long, default_value = "/etc/tunnelfleet/pki")]
        dir: PathBuf,
        /// Names and addresses agents dial the coordinator by (repeatable).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// The fleet's SSH CAs: the user CA that certifies agents' own SSH keys for the OMAs, and
    /// the host CA that certifies OMAs' host keys for the agents; each made in DIR when it has
    /// none (`pki init` makes both). Prints the user CA's public key, the line every OMA's sshd
    /// trusts (`TrustedUserCAKeys`). The private keys (0600) are never printed.
    SshCa {
        /// PKI directory.
        #[arg(long, default_value = "/etc/tunnelfleet/pki")]
        dir: PathBuf,
    },
    /// Issue an agent's certificate; the agent id is taken from it by the coordinator.
    IssueAgent {
        /// Agent id (letters, digits, '.', '_', '-').
        id: String,
        /// PKI directory.
        #[arg(long, default_value = "/etc/tunnelfleet/pki")]
        dir: PathBuf,
        /// Where to write ID.pem, ID.key and ca.pem.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum NetAction {
    /// Check hosts: `host` or `host:port` (a port given with the host is an SSH port).
    /// Exit 0 when every check passed, 1 otherwise.
    Check {
        /// Hosts to check.
        #[arg(required_unless_present = "agent")]
        targets: Vec<String>,
        /// Run the check on this agent, against its OMA endpoints, through the coordinator.
        #[arg(long, conflicts_with = "targets")]
        agent: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
        /// TCP port that must be open (repeatable).
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// Port that must be open and greet with an SSH banner (repeatable).
        #[arg(long = "ssh-port")]
        ssh_ports: Vec<u16>,
        /// Latency probes per host.
        #[arg(long, default_value_t = 4)]
        probes: u32,
        /// Deadline per probe, connect and banner.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Throughput of an HTTP download through a profile's L forward (default URL: the
    /// profile's health URL).
    Bandwidth {
        /// Profile name.
        profile: String,
        /// URL to download; its port must be one of the profile's L forwards.
        #[arg(long)]
        url: Option<String>,
        /// Agent control socket.
        #[arg(long, env = "TUNNELFLEET_SOCKET")]
        socket: Option<PathBuf>,
        /// Read the socket path from this agent config instead.
        #[arg(long, default_value = "/etc/tunnelfleet/agent.toml")]
        config: PathBuf,
        /// Deadline for the whole download.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum TunnelAction {
    /// Profiles with their endpoints and state.
    List,
    /// Every profile and forward: state, endpoint, uptime, reconnects, health, bytes.
    Status,
    /// Start a stopped profile (or every profile with --all).
    Start(Target),
    /// Stop a profile, draining open connections first (or every profile with --all).
    Stop(Target),
    /// Re-establish a profile's session now.
    Restart {
        /// Profile name.
        name: String,
    },
    /// Run a profile's health check now (exit 1 when it fails).
    Health {
        /// Profile name.
        name: String,
    },
    /// Live status, refreshed in place (the agent restarts failed tunnels by itself; this
    /// shows it). With --json, one status object per line.
    Monitor {
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Stop after this many refreshes (0 = until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

/// A profile name, or --all.
#[derive(clap::Args, Debug)]
pub(super) struct Target {
    /// Profile name.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(super) name: Option<String>,
    /// Every configured profile.
    #[arg(long)]
    pub(super) all: bool,
}

/// `tunnelfleet oma …`
#[derive(Subcommand, Debug)]
pub enum OmaAction {
    /// Every endpoint of every group: health, which is active, which agents are on it.
    List,
    /// Create or replace the groups of a TOML file (`[[group]]` with name, endpoints, …).
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Delete a group no profile uses.
    Delete {
        /// Group name.
        group: String,
    },
    /// Take an endpoint out of service: its groups move to the next endpoint, the new
    /// sessions up before the old ones close.
    Drain {
        /// `host:port`.
        endpoint: String,
    },
    /// Put a drained endpoint back (failback to it follows the usual stable period).
    Undrain {
        /// `host:port`.
        endpoint: String,
    },
    /// Move a group to its next usable endpoint now.
    Failover {
        /// Group name.
        group: String,
    },
    /// Move a group back to its highest-priority usable endpoint now (no stable period).
    Failback {
        /// Group name.
        group: String,
    },
    /// Certify an OMA's ed25519 host key with the fleet's SSH host CA (admin token), for the
    /// host name of ENDPOINT (an endpoint of an OMA group): agents whose profiles say
    /// `fleet_host_ca = true` then trust that OMA with no known_hosts line or pin. Writes the
    /// certificate beside the key (`ssh_host_ed25519_key-cert.pub`) for sshd's
    /// `HostCertificate`; renew it before it runs out (`--validity`, a year by default).
    HostCert {
        /// The endpoint agents dial (`host:port`, as listed in its group).
        endpoint: String,
        /// The OMA's host public key.
        #[arg(long, default_value = "/etc/ssh/ssh_host_ed25519_key.pub")]
        key: PathBuf,
        /// Where to write the certificate (default: KEY with `.pub` replaced by `-cert.pub`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// How long it is valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        validity: Duration,
    },
    /// Print the sshd drop-in for the OMAs of a group: trust the fleet's SSH user CA, the
    /// principals and revocation files `oma sync` writes, dead sessions dropped in 15 s.
    SshdConfig {
        /// Group name.
        group: String,
        /// Where `oma sync` writes on the OMA.
        #[arg(long, default_value = "/etc/ssh/tunnelfleet")]
        dir: PathBuf,
    },
    /// On an OMA (a timer runs it): fetch the group's SSH CA key, principals lines (each
    /// agent's ports) and revoked keys, and write them into DIR atomically. Nothing is written
    /// unless all three came; the revocation file is never left absent (sshd would then refuse
    /// every key). Then ends the sessions revoked agents still hold on this OMA (sshd checks
    /// revocation only at login): found by the certificate's key id in sshd's log and the
    /// kernel's TCP table, both agreeing. Needs a viewer token, and root for the sessions.
    Sync {
        /// Group name.
        group: String,
        /// Directory sshd reads them from (made 0755 when missing).
        #[arg(long, default_value = "/etc/ssh/tunnelfleet")]
        dir: PathBuf,
        /// Where sshd logs its logins: `journal`, or a file (`/var/log/auth.log`).
        #[arg(long, default_value = "journal")]
        sshd_log: crate::sshd_sessions::LogSource,
    },
}

/// `tunnelfleet alerts …`
#[derive(Subcommand, Debug)]
pub enum AlertsAction {
    /// Firing alerts (with --all, resolved ones too).
    List {
        /// Include resolved alerts.
        #[arg(long)]
        all: bool,
    },
    /// One alert.
    Show {
        /// Alert id.
        id: u64,
    },
    /// Acknowledge an alert: someone is on it.
    Ack {
        /// Alert id.
        id: u64,
        /// Who (default: $USER).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
    /// Record but do not deliver alerts whose `kind:subject` matches a glob, for a while.
    ///
    /// Example: tunnelfleet alerts silence 'oma_down:10.0.0.1:*' --for 2h --comment "maintenance"
    Silence {
        /// Glob on `kind:subject` (`*` matches anything).
        matcher: String,
        /// How long (`30m`, `2h`).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Why, recorded with the revocation.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Silences in force.
    Silences,
    /// Hook deliveries: delivered, failed attempts, backlog, last error. Exit 1 when a hook
    /// has a backlog with failures.
    Hooks,
}

/// `tunnelfleet token …`
#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Make a one-time join token; an agent started with it (and the CA fingerprint) enrolls
    /// itself. The token is printed once and cannot be shown again.
    #[command(
        after_help = "Examples:\n  tunnelfleet token create --label site=dc1 --ttl 1h\n  tunnelfleet token create --agent vma-17 --ttl 30m   # re-enroll a replaced appliance"
    )]
    Create {
        /// A label the enrolled agent gets, `key=value` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How long the token is good for (at most a week).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Only this agent id may use it (required to re-enroll an agent the fleet knows).
        #[arg(long)]
        agent: Option<String>,
    },
    /// Every token: unused, used (by whom) and expired.
    List,
    /// Delete a token by its id (`token list` shows ids).
    Delete {
        /// Token id.
        id: String,
    },
}

/// `tunnelfleet admin-token …`
#[derive(Subcommand, Debug)]
pub enum AdminTokenAction {
    /// Make a named admin token; the secret is printed once (the coordinator keeps its hash).
    #[command(
        after_help = "Examples:\n  tunnelfleet admin-token create alice --role operator > alice.token\n  tunnelfleet admin-token create grafana --role viewer"
    )]
    Create {
        /// Who holds it: the name the audit log shows.
        name: String,
        /// What it may do.
        #[arg(long, value_parser = parse_role)]
        role: tunnelfleet_coordinator::store::Role,
    },
    /// Every named token and its role (the `admin_token_file`'s is an admin and not listed).
    List,
    /// Revoke a token by name: refused from the next request on.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// `tunnelfleet rollout …`
#[derive(Subcommand, Debug)]
pub enum RolloutAction {
    /// Push the new version to the halted stage again (its failed agents included) and wait
    /// on it from the start.
    Resume,
    /// Abandon it: every agent gets the profiles from before it back, as a new version.
    Abort,
}

/// `5` or `2%`.
pub fn parse_canary(
    s: &str,
) -> Result<
    tunnelfleet_coordinator::rollout::Canary,
    tunnelfleet_coordinator::rollout::plan::CanaryError,
> {
    s.parse()
}

/// `viewer`, `operator` or `admin`.
pub fn parse_role(
    s: &str,
) -> Result<tunnelfleet_coordinator::store::Role, tunnelfleet_coordinator::store::UnknownRole> {
    s.parse()
}

/// A `--label` that is not `key=value`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected key=value")]
pub struct LabelError(String);

/// `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| LabelError(s.to_string()))
}
