//! Printing results: JSON for `--json`, one line or a table for people.

use std::process::ExitCode;

use tunnelfleet_coordinator::admin::Done;

use crate::api::ApiClient;

pub(super) fn join(v: &serde_json::Value) -> String {
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

pub(super) fn print_changed(changed: &serde_json::Value, json: bool) -> anyhow::Result<ExitCode> {
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

pub(super) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(super) async fn done<B: serde::Serialize>(
    client: &ApiClient,
    path: &str,
    body: Option<&B>,
    json: bool,
) -> anyhow::Result<()> {
    let d: Done = client.call("POST", path, body).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        println!("{}", d.message);
    }
    Ok(())
}
