//! An agent in this process with a real control socket, and profile snippets for its config.

use crate::children::SpawnOwned;
use crate::sshd::Sshd;
use crate::wait::wait_until;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::control;
use tunnelfleet_agent::status::{AgentStatus, ProfileStatus};
use tunnelfleet_agent::supervisor::{Request, Response};

/// An agent running in this process with a real control socket.
pub struct TestAgent {
    /// Its control socket.
    pub socket: PathBuf,
    /// Where it serves `/metrics`, when `agent.metrics_listen` was given.
    pub metrics: Option<std::net::SocketAddr>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The agent as a process (in a test host) instead of a task in this one.
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl TestAgent {
    /// Its process id, when it runs as a process (in a test host).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Starts an agent from TOML (the `[agent]` section is added: socket in a temp dir).
    pub async fn start(profiles_toml: &str) -> TestAgent {
        Self::start_with("", profiles_toml).await
    }

    /// Like [`TestAgent::start`], with `agent_keys` (TOML lines) added to the `[agent]` section.
    pub async fn start_with(agent_keys: &str, profiles_toml: &str) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let text = config_text(&socket, agent_keys, profiles_toml);
        let cfg = AgentConfig::parse(&text, Path::new("test.toml")).expect("test config");
        let agent = tunnelfleet_agent::agent::Agent::prepare(&cfg)
            .await
            .expect("agent prepare");
        let metrics = agent.metrics_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent.run(stop.clone()));
        TestAgent {
            socket,
            metrics,
            stop,
            task: Some(task),
            child: None,
            _dir: dir,
        }
    }

    /// The real agent binary as a process inside test host `host` (its own network: its
    /// links are the only way out), with the same `[agent]` section as [`TestAgent::start`]
    /// plus `agent_keys`; its log is `agent.log` in its dir. Its control socket is a file, so
    /// this process reads its status as any other's.
    pub async fn start_in(
        host: &crate::NetHost,
        agent_keys: &str,
        profiles_toml: &str,
    ) -> TestAgent {
        TestAgent::start_binary_in(
            host,
            &crate::Program::Agent.path(),
            agent_keys,
            profiles_toml,
        )
        .await
    }

    /// Like [`TestAgent::start_in`] with the agent binary at `program` (a benchmark's `dist`
    /// build).
    pub async fn start_binary_in(
        host: &crate::NetHost,
        program: &Path,
        agent_keys: &str,
        profiles_toml: &str,
    ) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let text = config_text(&socket, agent_keys, profiles_toml);
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, text).expect("agent.toml");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("agent.log");
        let child = host
            .command(program)
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn_owned()
            .expect("spawn the agent");
        let agent = TestAgent {
            socket,
            metrics: None,
            stop: CancellationToken::new(),
            task: None,
            child: Some(child),
            _dir: dir,
        };
        wait_until(20, "the agent process's control socket", || async {
            control::call(&agent.socket, &Request::Status).await.is_ok()
        })
        .await;
        agent
    }

    /// The agent process's log so far (empty for an agent in this process).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Status through the control socket.
    pub async fn status(&self) -> AgentStatus {
        match control::call(&self.socket, &Request::Status).await {
            Ok(Response::Status(s)) => s,
            other => panic!("status: {other:?}"),
        }
    }

    /// One profile's status.
    pub async fn profile(&self, name: &str) -> ProfileStatus {
        self.status()
            .await
            .profiles
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no profile {name}"))
    }

    /// Sends a command.
    pub async fn call(&self, req: Request) -> Response {
        control::call(&self.socket, &req)
            .await
            .expect("control call")
    }

    /// Stops the agent gracefully and waits for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        if let Some(mut c) = self.child.take() {
            crate::faults::signal(c.id(), libc::SIGTERM);
            let _ = tokio::task::spawn_blocking(move || c.wait()).await;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A test agent's whole config: the `[agent]` section (its control socket, a short drain
/// unless `agent_keys` sets one, then `agent_keys`) and `profiles_toml`.
fn config_text(socket: &Path, agent_keys: &str, profiles_toml: &str) -> String {
    let drain = if agent_keys.contains("drain_timeout") {
        ""
    } else {
        "drain_timeout = \"1s\"\n"
    };
    format!(
        "[agent]\ncontrol_socket = \"{}\"\n{drain}{agent_keys}\n\n{profiles_toml}",
        socket.display()
    )
}

/// A profile block for tests, with short timings so failures show in seconds.
pub fn profile_toml(
    name: &str,
    endpoints: &[String],
    sshd: &Sshd,
    forwards: &[String],
    extra: &str,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let fws: Vec<String> = forwards.iter().map(|f| format!("{f:?}")).collect();
    format!(
        "[[profile]]\nname = \"{name}\"\nendpoints = [{}]\nuser = \"{}\"\nidentity_file = \"{}\"\n\
         known_hosts = \"{}\"\nforwards = [{}]\nconnect_timeout = \"2s\"\nkeepalive_interval = \"1s\"\n\
         keepalive_count = 2\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nfailover_after = 2\n{extra}\n",
        eps.join(", "),
        sshd.user,
        sshd.client_key.display(),
        sshd.known_hosts.display(),
        fws.join(", "),
    )
}

impl TestAgent {
    /// An agent with one profile named `oma` on `sshd` (short test timings; `extra` TOML lines
    /// are added to the profile).
    pub async fn on(sshd: &Sshd, forwards: &[String], extra: &str) -> TestAgent {
        TestAgent::start(&profile_toml(
            "oma",
            &[sshd.endpoint()],
            sshd,
            forwards,
            extra,
        ))
        .await
    }

    /// An agent with one profile `oma` whose endpoints are `primary` then `standby` (both
    /// host keys pinned).
    pub async fn on_pair(primary: &Sshd, standby: &Sshd, forwards: &[String]) -> TestAgent {
        let pins = format!(
            "host_key_fingerprints = [{:?}, {:?}]",
            primary.fingerprint, standby.fingerprint
        );
        let endpoints = [primary.endpoint(), standby.endpoint()];
        TestAgent::start(&profile_toml("oma", &endpoints, primary, forwards, &pins)).await
    }

    /// Waits until profile `name` is up with every forward active.
    pub async fn wait_all_active(&self, name: &str) {
        wait_until(
            30,
            &format!("profile {name} up with every forward active"),
            || async {
                // A pushed profile appears only once applied: absent means not yet.
                self.status().await.profiles.iter().any(|p| {
                    p.name == name
                        && p.state == tunnelfleet_agent::status::TunnelState::Up
                        && p.forwards
                            .iter()
                            .all(|f| f.state == tunnelfleet_agent::status::ForwardState::Active)
                })
            },
        )
        .await;
    }
}
