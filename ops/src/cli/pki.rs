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
                println!(
                    "SSH user CA (the OMAs' TrustedUserCAKeys): {}",
                    dir.join(tunnelfleet_coordinator::sshca::SSH_CA_PUB)
                        .display()
                );
            }
        }
        PkiAction::SshCa { dir } => {
            use tunnelfleet_coordinator::sshca::SshCa;
            let made = match SshCa::load(&dir)? {
                Some(_) => false,
                None => {
                    SshCa::create(&dir)?;
                    true
                }
            };
            let ca = SshCa::load(&dir)?
                .ok_or_else(|| anyhow::anyhow!("{}: no SSH CA after making it", dir.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "dir": dir, "made": made, "public_key": ca.public_line(), "fingerprint": ca.fingerprint() })
                );
            } else {
                if made {
                    eprintln!("SSH user CA made in {} (key 0600)", dir.display());
                }
                println!("{}", ca.public_line());
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
