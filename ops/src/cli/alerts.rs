//! `tunnelfleet alerts …`: alerts, acknowledgements, silences and hook delivery.

use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use std::process::ExitCode;

use tunnelfleet_coordinator::admin::{AckRequest, SilenceRequest};
use tunnelfleet_coordinator::hooks::HookStats;
use tunnelfleet_coordinator::store::{Alert, Silence};

use super::args::AlertsAction;
use super::output::*;
use crate::api::ApiClient;
use crate::render;

/// Runs `alerts …`.
pub async fn alerts(
    client: &ApiClient,
    action: AlertsAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match action {
        AlertsAction::List { all } => {
            let v: Vec<Alert> = client
                .get(if all {
                    "/v1/alerts?all=true"
                } else {
                    "/v1/alerts"
                })
                .await?;
            if json {
                print_json(&v)?;
            } else {
                print!("{}", render::alerts_table(&v));
            }
        }
        AlertsAction::Show { id } => {
            let a: Alert = client.get(&format!("/v1/alerts/{id}")).await?;
            print_json(&a)?;
        }
        AlertsAction::Ack { id, by } => {
            let a: Alert = client
                .call(
                    "POST",
                    &format!("/v1/alerts/{id}/ack"),
                    Some(&AckRequest { by }),
                )
                .await?;
            if json {
                print_json(&a)?;
            } else {
                println!(
                    "alert {id} acknowledged by {}",
                    a.acked_by.unwrap_or_default()
                );
            }
        }
        AlertsAction::Silence {
            matcher,
            duration,
            comment,
        } => {
            let s: Silence = client
                .call(
                    "POST",
                    "/v1/silences",
                    Some(&SilenceRequest {
                        matcher,
                        for_s: duration.as_secs().max(1),
                        comment,
                    }),
                )
                .await?;
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "silence {} on {:?} for {}",
                    s.id,
                    s.matcher,
                    humantime::format_duration(duration)
                );
            }
        }
        AlertsAction::Silences => {
            let v: Vec<Silence> = client.get("/v1/silences").await?;
            print_json(&v)?;
        }
        AlertsAction::Hooks => {
            let v: Vec<HookStats> = client.get("/v1/hooks").await?;
            if json {
                print_json(&v)?;
            } else {
                let mut t = Table::new();
                t.load_preset(NOTHING);
                t.set_header(vec![
                    "HOOK",
                    "KIND",
                    "DELIVERED",
                    "FAILED ATTEMPTS",
                    "BACKLOG",
                    "LAST ERROR",
                ]);
                for h in &v {
                    t.add_row(vec![
                        Cell::new(&h.name),
                        Cell::new(&h.kind),
                        Cell::new(h.delivered),
                        Cell::new(h.failed_attempts),
                        Cell::new(h.pending),
                        Cell::new(h.last_error.as_deref().unwrap_or("-")),
                    ]);
                }
                println!("{t}");
            }
            if v.iter().any(|h| h.pending > 0 && h.last_error.is_some()) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
