//! `tunnelfleet coordinators`: the coordinators sharing the fleet state, who leads and since
//! when (as the coordinator asked sees it).

use std::process::ExitCode;

use tunnelfleet_coordinator::admin::coordinators::CoordinatorsView;

use crate::api::ApiClient;
use crate::render;

/// Prints the coordinators; exit 1 when nobody leads (an election under way, or etcd lost).
pub async fn coordinators(api: &ApiClient, json: bool) -> anyhow::Result<ExitCode> {
    let v: CoordinatorsView = api.get("/v1/coordinators").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let mut t = render::table(&[
            "NAME", "ROLE", "AGENTS", "CONTROL", "ADMIN", "UP", "VERSION",
        ]);
        for c in &v.coordinators {
            let role = if v.leader.as_deref() == Some(c.name.as_str()) {
                "leader"
            } else {
                "follower"
            };
            t.add_row(vec![
                c.name.clone(),
                role.into(),
                v.agents.get(&c.name).copied().unwrap_or(0).to_string(),
                c.control.clone(),
                c.admin.clone(),
                render::ago(c.started_unix_ms),
                c.version.clone(),
            ]);
        }
        println!("{t}");
        let since = v
            .since_unix_ms
            .map(|s| format!(" for {}", render::ago(s)))
            .unwrap_or_default();
        println!(
            "store: {}; asked {}, which is {}{since}; leader: {}",
            v.store,
            v.this,
            v.standing,
            v.leader
                .as_deref()
                .unwrap_or("none (an election is under way)")
        );
    }
    Ok(if v.leader.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
