//! `tunnelfleet profiles …`, `assign` and `rollout`: what the fleet's agents run, through the
//! coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use tunnelfleet_agent::config::AgentConfig;

use super::args::{ApiArgs, ProfilesAction, RolloutAction};
use super::output::*;
use crate::render;
use tunnelfleet_coordinator::admin::{Aborted, RolloutView};
use tunnelfleet_coordinator::store::{Rollout, RolloutState};

pub(super) async fn fleet_profiles(
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
        ProfilesAction::Apply {
            file,
            canary,
            wait,
            waves,
            settle,
        } => {
            let cfg = AgentConfig::load_for_coordinator(&file)?;
            if cfg.profiles.is_empty() {
                anyhow::bail!("{}: no [[profile]] in the file", file.display());
            }
            if let Some(canary) = canary {
                let req = tunnelfleet_coordinator::rollout::StartRequest {
                    profiles: cfg.profiles,
                    canary,
                    waves,
                    wait_ms: wait.as_millis() as u64,
                    settle_ms: settle.as_millis() as u64,
                };
                let r: Rollout = client.call("POST", "/v1/rollouts", Some(&req)).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!(
                        "version {}: staged over {} agents in {} stages, {} of health each; `tunnelfleet rollout` follows it",
                        r.version,
                        r.stages.iter().map(|s| s.agents.len()).sum::<usize>(),
                        r.stages.len(),
                        humantime::format_duration(wait)
                    );
                    for s in &r.stages {
                        println!("  {}: {}", s.name, s.agents.join(", "));
                    }
                }
                return Ok(ExitCode::SUCCESS);
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
pub(super) async fn import_profiles(
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

/// `tunnelfleet assign`: a profile to one agent or to every agent with some labels.
pub(super) async fn assign(
    api: &ApiArgs,
    profile: String,
    agent: Option<String>,
    labels: Vec<(String, String)>,
    json: bool,
) -> anyhow::Result<ExitCode> {
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

/// `tunnelfleet rollout`: who applied the current version, who failed and why.
pub(super) async fn rollout(
    api: &ApiArgs,
    action: Option<RolloutAction>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    match action {
        Some(RolloutAction::Resume) => {
            let r: Rollout = client
                .call::<(), _>("POST", "/v1/rollouts/current/resume", None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "rollout of version {} resumed at {}",
                    r.version,
                    r.stages.get(r.current).map_or("-", |s| s.name.as_str())
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(RolloutAction::Abort) => {
            let a: Aborted = client
                .call::<(), _>("POST", "/v1/rollouts/current/abort", None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                println!(
                    "rollout of version {} aborted: version {} restores version {}'s profiles on every agent",
                    a.rollout.version, a.version, a.rollout.base_version
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let staged: Option<RolloutView> = client.get("/v1/rollouts/current").await?;
    let r: serde_json::Value = client.get("/v1/rollout").await?;
    if json {
        // The current version's view as before, with the staged rollout beside it.
        let mut all = r.clone();
        if let Some(o) = all.as_object_mut() {
            o.insert("staged".into(), serde_json::to_value(&staged)?);
        }
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        if let Some(v) = &staged {
            print!("{}", render::staged_rollout(v));
        }
        println!("version {}", r["version"]);
        println!("  applied: {}", join(&r["applied"]));
        println!("  pending: {}", join(&r["pending"]));
        if let Some(failed) = r["failed"].as_object() {
            for (agent, errors) in failed {
                println!("  FAILED {agent}: {}", join(errors));
            }
        }
    }
    let halted = staged
        .as_ref()
        .is_some_and(|v| v.rollout.state == RolloutState::Halted);
    Ok(
        if halted || r["failed"].as_object().is_some_and(|f| !f.is_empty()) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}
