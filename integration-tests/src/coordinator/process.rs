//! A `tunnelfleet-coordinator` process (the test build) for end-to-end tests: started, killed,
//! restarted.

use super::*;

/// A `tunnelfleet-coordinator` process on loopback, for tests that kill it for real.
pub struct CoordinatorProcess {
    /// Where agents dial.
    pub control: std::net::SocketAddr,
    /// The admin API.
    pub api: tunnelfleet_ops::api::ApiClient,
    /// The admin API's address (for the CLI: `--coordinator`).
    pub admin: std::net::SocketAddr,
    /// The admin token file (for the CLI: `--token-file`).
    pub token_file: PathBuf,
    /// Its config file (a restart uses the same).
    pub config: PathBuf,
    env: Vec<(String, String)>,
    child: std::process::Child,
    log: PathBuf,
}

impl CoordinatorProcess {
    /// Waits until the first hook holds exactly one undelivered entry whose last attempt failed
    /// with `error` in its message (`tunnelfleet alerts hooks`).
    pub async fn wait_hook_backlog(&self, error: &str) {
        wait_until(
            30,
            &format!("one delivery kept in the outbox after {error:?}"),
            || async {
                let h: serde_json::Value = self.api.get("/v1/hooks").await.unwrap_or_default();
                h[0]["pending"] == 1
                    && h[0]["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains(error))
            },
        )
        .await;
    }
    /// Writes a config under `dir` (PKI in `dir/pki`, state in `dir/state`, fixed ports) and
    /// starts the coordinator; returns once its admin API answers.
    pub async fn start(dir: &Path, heartbeat: &str) -> CoordinatorProcess {
        Self::start_with(dir, heartbeat, "").await
    }

    /// As [`CoordinatorProcess::start`], with more config (`[[hook]]`s) appended.
    pub async fn start_with(dir: &Path, heartbeat: &str, extra: &str) -> CoordinatorProcess {
        Self::start_with_env(dir, heartbeat, extra, &[]).await
    }

    /// As [`CoordinatorProcess::start_with`], with environment variables for the process.
    pub async fn start_with_env(
        dir: &Path,
        heartbeat: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> CoordinatorProcess {
        let control = std::net::SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let token_file = dir.join("admin.token");
        let token = ADMIN_TOKEN;
        write_secret(&token_file, token.as_bytes());
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{control}\"\nadmin_listen = \"{admin}\"\npki_dir = \"{}\"\nstate_dir = \"{}\"\n\
                 admin_token_file = \"{}\"\nheartbeat_interval = \"{heartbeat}\"\n{extra}",
                dir.join("pki").display(),
                dir.join("state").display(),
                token_file.display()
            ),
        )
        .expect("coordinator config");
        // With `admin_tls`, the API is reached as the CLI would: https, by the certificate's
        // name, checked against the fleet CA.
        let api = if extra.contains("admin_tls = true") {
            tunnelfleet_ops::api::ApiClient::new(
                &format!("https://localhost:{}", admin.port()),
                token,
            )
            .with_ca(&dir.join("pki").join("ca.pem"))
            .expect("the fleet CA")
        } else {
            tunnelfleet_ops::api::ApiClient::new(&admin.to_string(), token)
        };
        let log = dir.join("coordinator.log");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::spawn(&config, &log, &env);
        let mut c = CoordinatorProcess {
            env,
            control,
            api,
            admin,
            token_file,
            config,
            child,
            log,
        };
        c.wait_ready().await;
        c
    }

    fn spawn(config: &Path, log: &Path, env: &[(String, String)]) -> std::process::Child {
        let bin = Program::Coordinator.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        crate::children::owned(bin)
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn_owned()
            .expect("spawn coordinator")
    }

    async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .api
                .get::<serde_json::Value>("/v1/agents")
                .await
                .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("coordinator exited with {status}:\n{}", self.log());
            }
            if std::time::Instant::now() > deadline {
                panic!("coordinator not ready within 30s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same config (state dir and ports).
    pub async fn restart(&mut self) {
        self.child = Self::spawn(&self.config, &self.log, &self.env);
        self.wait_ready().await;
    }

    /// Its process id (for `/proc/<pid>`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
