//! `tunnelfleet oma …`: OMA groups, endpoint health and planned moves through the coordinator.

use std::process::ExitCode;

use anyhow::Context;

use serde::Deserialize;
use tunnelfleet_coordinator::admin::{Changed, EndpointRequest};
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::store::OmaGroup;

use super::args::OmaAction;
use super::output::*;
use crate::api::ApiClient;
use crate::render;

/// A groups file for `oma apply`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupsFile {
    group: Vec<OmaGroup>,
}

/// Reads and checks a groups file (`[[group]]` blocks); a bad file is refused whole, with the
/// file, group and key in the error.
pub fn load_groups(file: &std::path::Path) -> anyhow::Result<Vec<OmaGroup>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let groups: GroupsFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
    for g in &groups.group {
        g.validate()
            .map_err(|e| anyhow::anyhow!("{}: group.{}.{e}", file.display(), g.name))?;
    }
    Ok(groups.group)
}

/// Where ssh-keygen puts the certificate of `key` (`x.pub` -> `x-cert.pub`).
fn host_cert_path(key: &std::path::Path) -> std::path::PathBuf {
    let name = key
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = name.strip_suffix(".pub").unwrap_or(&name);
    key.with_file_name(format!("{stem}-cert.pub"))
}

/// Runs `oma …`.
pub async fn oma(client: &ApiClient, action: OmaAction, json: bool) -> anyhow::Result<ExitCode> {
    match action {
        OmaAction::List => {
            let v: Vec<EndpointView> = client.get("/v1/oma").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render::oma_table(&v));
            }
        }
        OmaAction::Apply { file } => {
            let groups = load_groups(&file)?;
            for g in &groups {
                let c: Changed = client
                    .call("PUT", &format!("/v1/groups/{}", g.name), Some(g))
                    .await?;
                if json {
                    println!("{}", serde_json::to_string(&c)?);
                } else {
                    println!("group {}: version {}", g.name, c.version);
                }
            }
        }
        OmaAction::HostCert {
            endpoint,
            key,
            out,
            validity,
        } => {
            let public_key = std::fs::read_to_string(&key)
                .with_context(|| format!("{}: cannot read the host key", key.display()))?;
            let cert: tunnelfleet_coordinator::admin::HostCert = client
                .call(
                    "POST",
                    "/v1/oma/host-cert",
                    Some(&tunnelfleet_coordinator::admin::HostCertRequest {
                        endpoint: endpoint.clone(),
                        public_key: public_key.trim().to_string(),
                        validity_s: Some(validity.as_secs()),
                    }),
                )
                .await?;
            let out = out.unwrap_or_else(|| host_cert_path(&key));
            tunnelfleet_runtime::secret::write_atomic(
                &out,
                format!("{}\n", cert.certificate.trim()).as_bytes(),
                0o644,
            )
            .with_context(|| format!("{}: cannot write", out.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": out, "serial": cert.serial, "principals": cert.principals, "valid_before_unix_s": cert.valid_before_unix_s, "ca_fingerprint": cert.ca_fingerprint})
                );
            } else {
                println!(
                    "{}: host certificate for {} (serial {}, CA {}), valid until {}",
                    out.display(),
                    cert.principals.join(", "),
                    cert.serial,
                    cert.ca_fingerprint,
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(cert.valid_before_unix_s)
                    )
                );
                println!(
                    "sshd: HostCertificate {} (then sshd -t && systemctl reload ssh)",
                    out.display()
                );
            }
        }
        OmaAction::SshdConfig { group, dir } => {
            print!("{}", super::oma_sync::sshd_config(&group, &dir));
        }
        OmaAction::Sync {
            group,
            dir,
            sshd_log,
        } => {
            let access: tunnelfleet_coordinator::admin::SshAccess =
                client.get(&format!("/v1/groups/{group}/ssh")).await?;
            let wrote = super::oma_sync::write(&dir, &access)?;
            if !json {
                println!(
                    "{}: {} principals, {} revoked keys (fleet version {})",
                    dir.display(),
                    wrote.principals,
                    wrote.revoked_keys,
                    wrote.version
                );
            }
            // The files are in place whatever happens next: a session that cannot be ended now
            // is tried again at the next run, and this one fails so the timer's unit says so.
            let revoked: std::collections::BTreeSet<String> =
                access.revoked_agents.iter().cloned().collect();
            let closed = tokio::task::spawn_blocking(move || {
                crate::sshd_sessions::close_revoked(&sshd_log, &revoked)
            })
            .await
            .context("ending revoked sessions")??;
            if json {
                println!("{}", serde_json::json!({"wrote": wrote, "closed": closed}));
            } else {
                for c in &closed {
                    println!(
                        "ended the session of revoked agent {} (certificate serial {}) from {}: sshd pids {:?}",
                        c.agent, c.serial, c.from, c.pids
                    );
                }
            }
        }
        OmaAction::Delete { group } => {
            let c: Changed = client
                .call::<(), _>("DELETE", &format!("/v1/groups/{group}"), None)
                .await?;
            println!("group {group} deleted: version {}", c.version);
        }
        OmaAction::Drain { endpoint } => {
            done(
                client,
                "/v1/oma/drain",
                Some(&EndpointRequest { endpoint }),
                json,
            )
            .await?
        }
        OmaAction::Undrain { endpoint } => {
            done(
                client,
                "/v1/oma/undrain",
                Some(&EndpointRequest { endpoint }),
                json,
            )
            .await?
        }
        OmaAction::Failover { group } => {
            done::<()>(client, &format!("/v1/groups/{group}/failover"), None, json).await?
        }
        OmaAction::Failback { group } => {
            done::<()>(client, &format!("/v1/groups/{group}/failback"), None, json).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
