//! The real coordinator killed with SIGKILL at random moments, 200 times, while a client streams
//! profile applies, OMA-group changes and token creations, and an OMA endpoint flaps so alerts
//! fire and resolve with webhook deliveries. After every restart sled opens and every write the
//! coordinator acknowledged is there; at the end every alert state was delivered at least once
//! (by its idempotency key) and the agent runs the last version.
//!
//! `TUNNELFLEET_CRASH_ROUNDS` changes the number of kills; the seed of the random moments is
//! printed (`TUNNELFLEET_CRASH_SEED` replays one).

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::*;
use rand::{RngExt, SeedableRng};
use tunnelfleet_coordinator::admin::TokenCreated;
use tunnelfleet_coordinator::pki;
use tunnelfleet_coordinator::store::{Alert, AlertStatus, OmaGroup};

/// One write the coordinator answered 2xx to.
#[derive(Debug, Clone)]
enum Acked {
    Profile(String),
    Token(String),
    Group(String),
}

/// Streams writes until aborted; records each one acknowledged.
async fn stream_writes(
    api: tunnelfleet_ops::api::ApiClient,
    round: usize,
    acked: Arc<Mutex<Vec<Acked>>>,
) {
    for n in 0u64.. {
        let done = match n % 3 {
            0 => {
                let name = format!("p{round}-{n}");
                let spec = profile_spec(&name, &["L 18082:localhost:8082"]);
                api.call::<_, serde_json::Value>(
                    "PUT",
                    &format!("/v1/profiles/{name}"),
                    Some(&spec),
                )
                .await
                .ok()
                .map(|_| Acked::Profile(name))
            }
            1 => {
                let req =
                    serde_json::json!({ "ttl_s": 3600, "labels": { "round": round.to_string() } });
                api.call::<_, TokenCreated>("POST", "/v1/tokens", Some(&req))
                    .await
                    .ok()
                    .map(|t| Acked::Token(t.info.id))
            }
            _ => {
                let name = format!("g{round}-{n}");
                // Not probed: nothing is ever sent to these documentation addresses.
                let g = OmaGroup::probed(
                    &name,
                    vec![format!("198.18.200.{}:22", n % 250 + 1)],
                    Duration::from_secs(5),
                    Duration::from_secs(1),
                    Duration::from_secs(300),
                );
                let mut g = g;
                g.probe = false;
                api.call::<_, serde_json::Value>("PUT", &format!("/v1/groups/{name}"), Some(&g))
                    .await
                    .ok()
                    .map(|_| Acked::Group(name))
            }
        };
        match done {
            Some(a) => acked.lock().unwrap().push(a),
            // The coordinator is gone (killed); the next round restarts it.
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_kill_9s_lose_nothing_acknowledged() {
    let rounds: usize = std::env::var("TUNNELFLEET_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("TUNNELFLEET_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash loop: {rounds} rounds, TUNNELFLEET_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let sink = WebhookSink::start(0).await.unwrap();
    let secret = dir.path().join("webhook.secret");
    write_secret(&secret, b"crash-loop-webhook-secret");
    let hook = format!(
        "[[hook]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{}/alerts\"\nsecret_file = \"{}\"\ntimeout = \"2s\"\n",
        sink.port,
        secret.display()
    );
    let mut c = CoordinatorProcess::start_with(dir.path(), "500ms", &hook).await;
    // An OMA endpoint that flaps (nothing listens, then an sshd-like banner): oma_down fires
    // and resolves again and again across the kills.
    let flapping = format!("127.0.0.1:{}", free_port());
    put_probed_group(&c.api, &flapping).await;
    let mut up: Option<tokio_util::sync::DropGuard> = None;

    // An agent that lives through every kill.
    let agent = TestAgent::start(&agent_section(
        c.control,
        dir.path(),
        "vma-1",
        "site = \"dc1\"",
    ))
    .await;

    let mut all_acked: Vec<Acked> = Vec::new();
    for round in 0..rounds {
        if round % 20 == 19 {
            up = match up.take() {
                Some(_) => None,
                None => {
                    let l = tokio::net::TcpListener::bind(&flapping).await.unwrap();
                    Some(serve_ssh_banner_until_dropped(l))
                }
            };
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writer = tokio::spawn(stream_writes(c.api.clone(), round, acked.clone()));
        // Mostly short lives (killed within 200 ms of starting); every tenth lives long enough
        // for three failed probes, so incidents fire and resolve between the kills.
        let life = if round % 10 == 9 {
            rng.random_range(1_000..2_500)
        } else {
            rng.random_range(5..200)
        };
        tokio::time::sleep(Duration::from_millis(life)).await;
        c.kill9();
        writer.abort();
        let _ = writer.await;
        // Restarted: sled opens (a corrupt store would fail here, with the log).
        c.restart().await;
        all_acked.extend(acked.lock().unwrap().iter().cloned());
        let names = |v: serde_json::Value, key: &str| -> BTreeSet<String> {
            v.as_array()
                .unwrap()
                .iter()
                .filter_map(|x| x[key].as_str().map(String::from))
                .collect()
        };
        let profiles = names(c.api.get("/v1/profiles").await.unwrap(), "name");
        let tokens = names(c.api.get("/v1/tokens").await.unwrap(), "id");
        let groups = names(c.api.get("/v1/groups").await.unwrap(), "name");
        for a in &all_acked {
            let (set, name) = match a {
                Acked::Profile(n) => (&profiles, n),
                Acked::Token(n) => (&tokens, n),
                Acked::Group(n) => (&groups, n),
            };
            assert!(
                set.contains(name),
                "round {round} (seed {seed}): acknowledged {a:?} lost after kill -9\n{}",
                c.log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    eprintln!(
        "crash loop: {} acknowledged writes checked after every kill",
        all_acked.len()
    );
    assert!(
        all_acked.len() >= rounds,
        "too few writes acknowledged to mean anything"
    );

    // Every alert state the store holds reaches the webhook at least once.
    let want = || async {
        let alerts: Vec<Alert> = c.api.get("/v1/alerts?all=true").await.unwrap();
        let mut want = BTreeSet::new();
        for a in alerts.iter().filter(|a| !a.silenced) {
            want.insert((a.id, "firing"));
            if a.status == AlertStatus::Resolved {
                want.insert((a.id, "resolved"));
            }
        }
        want
    };
    let delivered = || -> BTreeSet<(u64, &'static str)> {
        sink.delivered()
            .iter()
            .filter_map(|r| {
                let j = r.json();
                let status = match j["status"].as_str()? {
                    "firing" => "firing",
                    "resolved" => "resolved",
                    _ => return None,
                };
                Some((j["alert"]["id"].as_u64()?, status))
            })
            .collect()
    };
    let all_delivered = tunnelfleet_standins::wait::wait_until(60, "", || async {
        let want = want().await;
        !want.is_empty() && want.is_subset(&delivered())
    })
    .await;
    if all_delivered.is_err() {
        let hooks: serde_json::Value = c.api.get("/v1/hooks").await.unwrap();
        panic!(
            "seed {seed}: alert states {:?} never delivered (delivered {:?}); hooks {hooks}",
            want().await.difference(&delivered()).collect::<Vec<_>>(),
            delivered()
        );
    }
    eprintln!("crash loop: {} alert states delivered", want().await.len());

    // The agent converges on the last version.
    let version = |v: serde_json::Value| v["version"].as_u64();
    wait_until(60, "the agent on the current version", || async {
        let rollout: serde_json::Value = c.api.get("/v1/rollout").await.unwrap();
        let agents: serde_json::Value = c.api.get("/v1/agents").await.unwrap();
        let current = version(rollout);
        agents
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == "vma-1" && a["applied_version"].as_u64() == current)
    })
    .await;
    drop(up);
    agent.shutdown().await;
}
