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
                println!(
                    "SSH host CA (signs OMAs' host keys: tunnelfleet oma host-cert): {}",
                    dir.join(tunnelfleet_coordinator::sshca::SSH_HOST_CA_PUB)
                        .display()
                );
            }
        }
        PkiAction::SshCa { dir } => {
            use tunnelfleet_coordinator::sshca::{CaKind, SshCa};
            let mut made = Vec::new();
            for kind in [CaKind::User, CaKind::Host] {
                if SshCa::load(&dir, kind)?.is_none() {
                    SshCa::create(&dir, kind)?;
                    made.push(kind.key_file());
                }
            }
            let loaded = |kind: CaKind| {
                SshCa::load(&dir, kind)?.ok_or_else(|| {
                    anyhow::anyhow!("{}: no {} after making it", dir.display(), kind.key_file())
                })
            };
            let (user, host) = (loaded(CaKind::User)?, loaded(CaKind::Host)?);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "dir": dir, "made": made, "public_key": user.public_line(), "fingerprint": user.fingerprint(), "host_public_key": host.public_line(), "host_fingerprint": host.fingerprint() })
                );
            } else {
                for m in &made {
                    eprintln!("{m} made in {} (key 0600)", dir.display());
                }
                eprintln!(
                    "SSH host CA (agents trust OMA host certificates it signs): {}",
                    host.fingerprint()
                );
                println!("{}", user.public_line());
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
