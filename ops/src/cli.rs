//! `tunnelfleet`, the operator CLI: its arguments and what each command does. The binary is a
//! one-line `main` over [`main`], so that the tests can build the same CLI into their own
//! binary (same features as the test build, no second compile of the workspace).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::{audit, demo, net, render};
use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::control::{self, ControlError};
use tunnelfleet_agent::status::AgentStatus;
use tunnelfleet_agent::supervisor::{Request, Response};
use tunnelfleet_runtime::telemetry::{self, LogFormat};

/// Exit code when the agent cannot be reached.
const EXIT_UNREACHABLE: u8 = 3;

/// Operate tunnelfleet: the fleet (through the coordinator), the local agent's tunnels, and the demo.
#[derive(Parser, Debug)]
#[command(
    name = "tunnelfleet",
    version,
    about,
    after_help = "Examples:\n  tunnelfleet demo\n  tunnelfleet tunnels status\n  tunnelfleet tunnels restart oma --socket /run/tunnelfleet/agent.sock\n  tunnelfleet tunnels list --json | jq '.profiles[].name'\n  tunnelfleet watch\n  tunnelfleet profiles diff -f profiles.toml && tunnelfleet profiles apply -f profiles.toml\n  tunnelfleet oma failover oma-dc1\n  tunnelfleet token create --label site=dc1 --ttl 1h\n  tunnelfleet completions bash > /etc/bash_completion.d/tunnelfleet\n\nExit codes: 0 ok, 1 failure (or a failed check), 2 changes pending (profiles diff --detailed-exitcode), 3 agent or coordinator unreachable."
)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
        opts: audit::AuditOptions,
        /// Audit this agent's host through the coordinator (with its default options).
        #[arg(long, conflicts_with = "all")]
        agent: Option<String>,
        /// Audit every connected agent's host through the coordinator.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        api: ApiArgs,
        /// Exit 1 when a finding is at least this severe.
        #[arg(long, value_enum, default_value_t = audit::Severity::High)]
        fail_on: audit::Severity,
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
        #[arg(long = "label", value_parser = crate::access::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Rollout of the current version: which agents applied it, which failed and why.
    Rollout {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// OMA groups: endpoint health, which agents are on each, drain, failover, failback.
    Oma {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: crate::fleet::OmaAction,
    },
    /// Alerts: list, show, ack, silence, and the state of their delivery hooks.
    Alerts {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: crate::fleet::AlertsAction,
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
        action: crate::access::TokenAction,
    },
    /// The fleet's certificate authority.
    Pki {
        #[command(subcommand)]
        action: PkiAction,
    },
    /// Run the whole system on this machine with nothing set up: a coordinator, an embedded OMA
    /// pair, three agents with the seed's tunnels, a pushed change, a failover.
    Demo,
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Where the coordinator's admin API is and how to authenticate.
#[derive(clap::Args, Debug)]
struct ApiArgs {
    /// Admin API address.
    #[arg(
        long,
        env = "TUNNELFLEET_COORDINATOR",
        default_value = "127.0.0.1:4480",
        global = true
    )]
    coordinator: String,
    /// File holding the admin bearer token.
    #[arg(
        long,
        env = "TUNNELFLEET_TOKEN_FILE",
        default_value = "/etc/tunnelfleet/admin.token",
        global = true
    )]
    token_file: PathBuf,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<crate::api::ApiClient> {
        let token = std::fs::read_to_string(&self.token_file).with_context(|| {
            format!("{}: cannot read the admin token", self.token_file.display())
        })?;
        Ok(crate::api::ApiClient::new(&self.coordinator, &token))
    }
}

#[derive(Subcommand, Debug)]
enum AgentsAction {
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
enum ProfilesAction {
    /// Every profile.
    List,
    /// One profile.
    Show {
        /// Profile name.
        name: String,
    },
    /// Create or replace the profiles of a file written like an agent config's [[profile]]s
    /// (validated by the agent's own rules before anything is sent).
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
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
enum PkiAction {
    /// Create the CA and the coordinator's certificate (refuses to replace an existing CA).
    Init {
        /// PKI directory (keys are written 0600).
        #[arg(long, default_value = "/etc/tunnelfleet/pki")]
        dir: PathBuf,
        /// Names and addresses agents dial the coordinator by (repeatable).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
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
enum NetAction {
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
enum TunnelAction {
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
struct Target {
    /// Profile name.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    name: Option<String>,
    /// Every configured profile.
    #[arg(long)]
    all: bool,
}

/// Runs the `tunnelfleet` command line from the process arguments; the exit code says how it went
/// (see the `--help` text).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings only: the commands print their own results; the demo's narration tells the story
    // and the agents' warnings (the failover) show beside it.
    let _telemetry = telemetry::init(LogFormat::Human, "warn", "tunnelfleet");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnelfleet: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tunnelfleet: {e:#}");
            if e.downcast_ref::<ControlError>().is_some()
                || matches!(
                    e.downcast_ref::<crate::api::ApiError>(),
                    Some(crate::api::ApiError::Unreachable { .. })
                )
            {
                ExitCode::from(EXIT_UNREACHABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo => {
            let mut out = std::io::stdout();
            let report = demo::run(&mut out).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tunnelfleet",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Tunnels {
            agent: Some(agent),
            api,
            action,
            ..
        } => {
            crate::fleet::remote_tunnels(&api.client()?, &agent, remote_action(action)?, cli.json)
                .await
        }
        Command::Tunnels {
            socket,
            config,
            action,
            ..
        } => tunnels(&control_socket(socket, &config)?, action, cli.json).await,
        Command::Net { action } => net(action, cli.json).await,
        Command::Pki { action } => pki(action, cli.json),
        Command::Agents { api, action } => fleet_agents(&api, action, cli.json).await,
        Command::Profiles { api, action } => fleet_profiles(&api, action, cli.json).await,
        Command::Assign {
            api,
            profile,
            agent,
            labels,
        } => {
            let json = cli.json;
            let req = serde_json::json!({
                "profile": profile,
                "agent": agent,
                "labels": labels.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            });
            let changed: serde_json::Value = api
                .client()?
                .call("POST", "/v1/assignments", Some(&req))
                .await?;
            print_changed(&changed, json)
        }
        Command::Oma { api, action } => crate::fleet::oma(&api.client()?, action, cli.json).await,
        Command::Watch {
            api,
            interval,
            count,
        } => crate::fleet::watch(&api.client()?, interval, count, cli.json).await,
        Command::Token { api, action } => {
            crate::access::token(&api.client()?, action, cli.json).await
        }
        Command::Alerts { api, action } => {
            crate::fleet::alerts(&api.client()?, action, cli.json).await
        }
        Command::Rollout { api } => {
            let json = cli.json;
            let r: serde_json::Value = api.client()?.get("/v1/rollout").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("version {}", r["version"]);
                println!("  applied: {}", join(&r["applied"]));
                println!("  pending: {}", join(&r["pending"]));
                if let Some(failed) = r["failed"].as_object() {
                    for (agent, errors) in failed {
                        println!("  FAILED {agent}: {}", join(errors));
                    }
                }
            }
            Ok(if r["failed"].as_object().is_some_and(|f| !f.is_empty()) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Audit {
            agent,
            all,
            api,
            fail_on,
            ..
        } if agent.is_some() || all => {
            crate::fleet::remote_audit(&api.client()?, agent, fail_on, cli.json).await
        }
        Command::Audit { opts, fail_on, .. } => {
            let report = tokio::task::spawn_blocking(move || audit::run(&opts)).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.worst().is_some_and(|w| w >= fail_on) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// A `tunnels` action as the coordinator can carry it to another agent.
fn remote_action(a: TunnelAction) -> anyhow::Result<crate::fleet::RemoteAction> {
    use crate::fleet::RemoteAction;
    use tunnelfleet_protocol::CommandAction;
    let one = |t: Target, what: &str| match (t.name, t.all) {
        (Some(n), false) => Ok(n),
        _ => Err(anyhow::anyhow!(
            "tunnels {what} --all --agent: name one profile (tunnels list --agent shows them)"
        )),
    };
    Ok(match a {
        TunnelAction::List | TunnelAction::Status => RemoteAction::Status,
        TunnelAction::Start(t) => RemoteAction::Command(CommandAction::Start, one(t, "start")?),
        TunnelAction::Stop(t) => RemoteAction::Command(CommandAction::Stop, one(t, "stop")?),
        TunnelAction::Restart { name } => RemoteAction::Command(CommandAction::Restart, name),
        TunnelAction::Health { name } => RemoteAction::Command(CommandAction::Health, name),
        TunnelAction::Monitor { .. } => {
            anyhow::bail!("tunnels monitor --agent: use `tunnelfleet watch` for the fleet")
        }
    })
}

fn join(v: &serde_json::Value) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

fn print_changed(changed: &serde_json::Value, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(changed)?);
    } else {
        println!(
            "version {} (pushed to {})",
            changed["version"],
            join(&changed["pushed_to"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn fleet_agents(api: &ApiArgs, action: AgentsAction, json: bool) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    match action {
        AgentsAction::List => {
            let list: Vec<tunnelfleet_coordinator::admin::AgentSummary> =
                client.get("/v1/agents").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", render::fleet_agents(&list));
            }
        }
        AgentsAction::Show { id } => {
            let a: serde_json::Value = client.get(&format!("/v1/agents/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&a)?);
        }
        AgentsAction::Revoke { id, reason } => {
            return crate::access::revoke(&client, &id, reason, json).await;
        }
        AgentsAction::Unrevoke { id } => {
            return crate::access::unrevoke(&client, &id, json).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn fleet_profiles(
    api: &ApiArgs,
    action: ProfilesAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let ProfilesAction::Import {
        file,
        format,
        name,
        identity_file,
        known_hosts,
        out,
        apply,
    } = action
    {
        let defaults = crate::import::Defaults {
            identity_file,
            known_hosts,
            name,
        };
        return import_profiles(api, &file, format, &defaults, out, apply, json).await;
    }
    let client = api.client()?;
    match action {
        ProfilesAction::Import { .. } => unreachable!("handled above"),
        ProfilesAction::List => {
            let list: serde_json::Value = client.get("/v1/profiles").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for p in list.as_array().into_iter().flatten() {
                    println!(
                        "{}  endpoints {}  forwards {}",
                        p["name"].as_str().unwrap_or(""),
                        join(&p["endpoints"]),
                        join(&p["forwards"])
                    );
                }
            }
        }
        ProfilesAction::Show { name } => {
            let p: serde_json::Value = client.get(&format!("/v1/profiles/{name}")).await?;
            println!("{}", serde_json::to_string_pretty(&p)?);
        }
        ProfilesAction::Apply { file } => {
            let cfg = AgentConfig::load_for_coordinator(&file)?;
            if cfg.profiles.is_empty() {
                anyhow::bail!("{}: no [[profile]] in the file", file.display());
            }
            for p in &cfg.profiles {
                let changed: serde_json::Value = client
                    .call("PUT", &format!("/v1/profiles/{}", p.name), Some(p))
                    .await?;
                if !json {
                    print!("{}: ", p.name);
                }
                print_changed(&changed, json)?;
            }
        }
        ProfilesAction::Diff {
            file,
            detailed_exitcode,
        } => {
            let cfg = AgentConfig::load_for_coordinator(&file)?;
            let specs = cfg.profiles;
            let plan: tunnelfleet_coordinator::plan::Plan =
                client.call("POST", "/v1/plan", Some(&specs)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", render::plan(&plan));
            }
            if detailed_exitcode && plan.has_changes() {
                return Ok(ExitCode::from(2));
            }
        }
        ProfilesAction::History { limit } => {
            let h: Vec<tunnelfleet_coordinator::store::RevisionSummary> =
                client.get(&format!("/v1/history?limit={limit}")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                let mut t =
                    render::table(&["VERSION", "WHEN", "PROFILES", "ASSIGNMENTS", "CHANGE"]);
                for r in &h {
                    t.add_row(vec![
                        r.version.to_string(),
                        format!("{} ago", render::ago(r.at_unix_ms)),
                        r.profiles.to_string(),
                        r.assignments.to_string(),
                        r.what.clone(),
                    ]);
                }
                println!("{t}");
            }
        }
        ProfilesAction::Rollback { version } => {
            let changed: serde_json::Value = client
                .call(
                    "POST",
                    "/v1/rollback",
                    Some(&tunnelfleet_coordinator::admin::RollbackRequest { version }),
                )
                .await?;
            print_changed(&changed, json)?;
        }
        ProfilesAction::Delete { name } => {
            let changed: serde_json::Value = client
                .call::<(), _>("DELETE", &format!("/v1/profiles/{name}"), None)
                .await?;
            print_changed(&changed, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tunnelfleet profiles import`.
async fn import_profiles(
    api: &ApiArgs,
    file: &std::path::Path,
    format: crate::import::Format,
    defaults: &crate::import::Defaults,
    out: Option<PathBuf>,
    apply: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let text = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?
    };
    let imported = crate::import::import(&text, format, defaults)
        .with_context(|| format!("{}", file.display()))?;
    let toml = imported.to_toml()?;
    let header = format!(
        "# Imported by `tunnelfleet profiles import` from {}.\n# Review the notes it printed before you apply this.\n\n",
        file.display()
    );
    match &out {
        Some(path) => {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| {
                    format!("{}: cannot create (it must not exist)", path.display())
                })?;
            f.write_all(header.as_bytes())?;
            f.write_all(toml.as_bytes())?;
        }
        None if !json => print!("{header}{toml}"),
        None => {}
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "profiles": imported.profiles,
                "notes": imported.notes,
                "toml": toml,
            }))?
        );
    } else {
        for n in &imported.notes {
            eprintln!("note: {} (line {}): {}", n.profile, n.line, n.text);
        }
        if let Some(path) = &out {
            eprintln!(
                "{} profile(s) written to {}",
                imported.profiles.len(),
                path.display()
            );
        }
    }
    if apply {
        let client = api.client()?;
        for p in &imported.profiles {
            let changed: serde_json::Value = client
                .call("PUT", &format!("/v1/profiles/{}", p.name), Some(p))
                .await?;
            if !json {
                eprint!("{}: ", p.name);
                eprintln!(
                    "version {} (pushed to {})",
                    changed["version"],
                    join(&changed["pushed_to"])
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn pki(action: PkiAction, json: bool) -> anyhow::Result<ExitCode> {
    use tunnelfleet_coordinator::pki;
    match action {
        PkiAction::Init { dir, names } => {
            let fp = pki::init(&dir, &names)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "dir": dir, "ca_fingerprint": fp, "names": names })
                );
            } else {
                println!(
                    "CA and coordinator certificate written to {}",
                    dir.display()
                );
                println!("CA fingerprint: {fp}");
                println!("coordinator names: {}", names.join(", "));
            }
        }
        PkiAction::IssueAgent { id, dir, out, days } => {
            let f = pki::issue_agent(&dir, &id, days, &out)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "agent": id, "cert": f.cert, "key": f.key, "ca": f.ca, "days": days })
                );
            } else {
                println!(
                    "agent {id}: certificate {}, key {} (0600), CA {}; valid {days} days",
                    f.cert.display(),
                    f.key.display(),
                    f.ca.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent's socket: given, or read from its config.
fn control_socket(socket: Option<PathBuf>, config: &std::path::Path) -> anyhow::Result<PathBuf> {
    match socket {
        Some(s) => Ok(s),
        None => Ok(AgentConfig::load(config)
            .with_context(|| "finding the agent's control socket (or pass --socket)")?
            .agent
            .control_socket),
    }
}

async fn net(action: NetAction, json: bool) -> anyhow::Result<ExitCode> {
    match action {
        NetAction::Check {
            agent: Some(agent),
            api,
            ..
        } => crate::fleet::remote_net_check(&api.client()?, &agent, json).await,
        NetAction::Check {
            targets,
            ports,
            ssh_ports,
            probes,
            timeout,
            ..
        } => {
            let opts = net::CheckOptions {
                ports,
                ssh_ports,
                probes: probes.max(1),
                timeout,
            };
            let mut reports = Vec::new();
            for t in &targets {
                reports.push(net::check(t, &opts).await);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", net::render(&reports));
            }
            Ok(if reports.iter().all(|r| r.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        NetAction::Bandwidth {
            profile,
            url,
            socket,
            config,
            timeout,
        } => {
            let socket = control_socket(socket, &config)?;
            let r = net::bandwidth(&socket, &profile, url.as_deref(), timeout).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: {} in {:.2}s = {:.1} Mbit/s through {} (agent counted {} into the forward)",
                    r.url,
                    render::bytes(r.bytes),
                    r.seconds,
                    r.mbit_s,
                    r.forward,
                    render::bytes(r.tunnel_bytes_in)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn tunnels(
    socket: &std::path::Path,
    action: TunnelAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let req = match action {
        TunnelAction::List | TunnelAction::Status => {
            let status = status(socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else if matches!(action, TunnelAction::List) {
                print!("{}", render::list(&status));
            } else {
                print!("{}", render::status(&status));
            }
            return Ok(ExitCode::SUCCESS);
        }
        TunnelAction::Monitor { interval, count } => {
            return monitor(socket, interval, count, json).await;
        }
        TunnelAction::Start(ref t) | TunnelAction::Stop(ref t) if t.all => {
            let start = matches!(action, TunnelAction::Start(_));
            let mut code = ExitCode::SUCCESS;
            for p in status(socket).await?.profiles {
                let req = if start {
                    Request::Start { name: p.name }
                } else {
                    Request::Stop { name: p.name }
                };
                if print_response(control::call(socket, &req).await?, json)? != ExitCode::SUCCESS {
                    code = ExitCode::FAILURE;
                }
            }
            return Ok(code);
        }
        TunnelAction::Start(t) => Request::Start {
            name: t.name.unwrap_or_default(),
        },
        TunnelAction::Stop(t) => Request::Stop {
            name: t.name.unwrap_or_default(),
        },
        TunnelAction::Restart { name } => Request::Restart { name },
        TunnelAction::Health { name } => Request::Health { name },
    };
    print_response(control::call(socket, &req).await?, json)
}

async fn status(socket: &std::path::Path) -> anyhow::Result<AgentStatus> {
    match control::call(socket, &Request::Status).await? {
        Response::Status(s) => Ok(s),
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

/// Prints a command's answer; the exit code says whether it succeeded.
fn print_response(resp: Response, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(&resp)?);
    }
    Ok(match resp {
        Response::Ok { message } => {
            if !json {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
        Response::Health(r) => {
            if !json {
                println!("{}", render::health(&r));
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Response::Status(_) => ExitCode::SUCCESS,
        Response::Error { message } => {
            eprintln!("tunnelfleet: {message}");
            ExitCode::FAILURE
        }
    })
}

async fn monitor(
    socket: &std::path::Path,
    interval: std::time::Duration,
    count: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    render::live(interval, count, json, || async {
        let s = status(socket).await?;
        let screen = format!(
            "tunnelfleet monitor: agent pid {} (every {}, Ctrl+C to stop)\n\n{}",
            s.pid,
            humantime::format_duration(interval),
            render::status(&s)
        );
        Ok((serde_json::to_string(&s)?, screen))
    })
    .await
}
