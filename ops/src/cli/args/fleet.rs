//! The admin API's subcommands: OMA groups, alerts, tokens, rollouts, and the parsers of their
//! values.

use super::*;

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
