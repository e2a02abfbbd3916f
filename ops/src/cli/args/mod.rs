//! The `tunnelfleet` argument tree (clap): every command, subcommand and flag, and nothing that
//! runs them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod fleet;
pub use fleet::*;

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
