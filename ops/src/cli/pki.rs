//! `tunnelfleet pki …`: the fleet CA and the certificates it signs.

use std::process::ExitCode;

use super::args::PkiAction;

pub(super) fn pki(action: PkiAction, json: bool) -> anyhow::Result<ExitCode> {
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
