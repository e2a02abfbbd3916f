//! `tunnelfleet oma sync GROUP` and `oma sshd-config GROUP`: what an OMA's stock sshd reads of
//! the fleet. The drop-in points sshd at three files in one directory; `sync` writes them from
//! the coordinator's answer: the SSH user CA's public key (`TrustedUserCAKeys`), one principal
//! line per agent with exactly its ports (`AuthorizedPrincipalsFile`), and the revoked agents'
//! keys (`RevokedKeys`). sshd reads them at every login, so a sync takes effect at once for new
//! sessions.
//!
//! Each file is replaced atomically (written beside it, then renamed), all three only after the
//! whole answer arrived: a failed fetch or a bad answer leaves the old files in place. The
//! revocation file always exists (an empty one revokes nothing): sshd refuses every public key
//! while `RevokedKeys` names a file it cannot read.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use tunnelfleet_coordinator::admin::SshAccess;

/// The CA's public key file.
pub const CA_FILE: &str = "ssh_user_ca.pub";
/// The principals file.
pub const PRINCIPALS_FILE: &str = "principals";
/// The revoked keys file.
pub const REVOKED_FILE: &str = "revoked_keys";

/// What a sync wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Wrote {
    /// The directory.
    pub dir: String,
    /// The fleet version of the lines.
    pub version: u64,
    /// Principal lines written.
    pub principals: usize,
    /// Revoked keys written.
    pub revoked_keys: usize,
}

/// The sshd drop-in for the OMAs of `group`, reading `oma sync`'s files in `dir`.
pub fn sshd_config(group: &str, dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# /etc/ssh/sshd_config.d/tunnelfleet.conf for the OMAs of group {group}: agents log in\n\
         # with the certificate the fleet's SSH user CA issued them; which ports each may open\n\
         # is its line in the principals file. `tunnelfleet oma sync {group} --dir {d}` keeps\n\
         # the three files current (run it first, then `sshd -t && systemctl reload ssh`).\n\
         TrustedUserCAKeys {d}/{CA_FILE}\n\
         AuthorizedPrincipalsFile {d}/{PRINCIPALS_FILE}\n\
         RevokedKeys {d}/{REVOKED_FILE}\n\
         # A session whose appliance is gone is dropped after 3 probes 5 s apart, freeing its\n\
         # reverse-forward ports for the agent's next session.\n\
         ClientAliveInterval 5\n\
         ClientAliveCountMax 3\n\
         # Certificates carry permit-port-forwarding only; nothing else is allowed to anyone.\n\
         AllowAgentForwarding no\n\
         X11Forwarding no\n\
         PermitUserRC no\n\
         GatewayPorts no\n\
         # Agents whose profiles say fleet_host_ca = true trust this OMA by a host certificate of\n\
         # the fleet (no known_hosts line, no pin): `tunnelfleet oma host-cert ENDPOINT` writes it,\n\
         # then uncomment:\n\
         # HostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub\n"
    )
}

/// Writes the three files of `access` into `dir`; refuses an answer sshd could not use.
pub fn write(dir: &Path, access: &SshAccess) -> anyhow::Result<Wrote> {
    let Some(ca) = access.ca_public_key.as_deref() else {
        bail!("the coordinator has no SSH user CA (tunnelfleet pki ssh-ca on it); nothing written");
    };
    // A line break inside a line would let the coordinator's answer add lines of its own.
    let one_line = |what: &str, l: &str| -> anyhow::Result<()> {
        if l.contains(['\n', '\r', '\0']) || l.trim().is_empty() {
            bail!("{what}: a line of the answer is empty or holds a line break; nothing written");
        }
        Ok(())
    };
    one_line("ssh CA key", ca)?;
    for l in &access.principals {
        one_line("principals", l)?;
    }
    for l in &access.revoked_keys {
        one_line("revoked keys", l)?;
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("{}: cannot set its mode", dir.display()))?;
    }
    let text =
        |lines: &[String]| -> String { lines.iter().map(|l| format!("{l}\n")).collect::<String>() };
    let header = format!(
        "# written by tunnelfleet oma sync {} at fleet version {}; changes are overwritten\n",
        access.group, access.version
    );
    let files = [
        (CA_FILE, format!("{ca}\n")),
        (
            PRINCIPALS_FILE,
            format!("{header}{}", text(&access.principals)),
        ),
        (
            REVOKED_FILE,
            format!("{header}{}", text(&access.revoked_keys)),
        ),
    ];
    for (name, body) in &files {
        let path = dir.join(name);
        tunnelfleet_runtime::secret::write_atomic(&path, body.as_bytes(), 0o644)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(Wrote {
        dir: dir.display().to_string(),
        version: access.version,
        principals: access.principals.len(),
        revoked_keys: access.revoked_keys.len(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    fn access() -> SshAccess {
        SshAccess {
            group: "oma-dc1".into(),
            version: 7,
            ca_public_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO ca".into()),
            principals: vec!["restrict,port-forwarding,permitopen=\"localhost:8082\" vma-1".into()],
            revoked_keys: Vec::new(),
            revoked_agents: Vec::new(),
        }
    }

    #[test]
    fn the_three_files_are_written_and_the_revocation_file_exists_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tf");
        let wrote = write(&out, &access()).unwrap();
        assert_eq!((wrote.principals, wrote.revoked_keys), (1, 0));
        let principals = std::fs::read_to_string(out.join(PRINCIPALS_FILE)).unwrap();
        assert!(
            principals.ends_with("permitopen=\"localhost:8082\" vma-1\n"),
            "{principals}"
        );
        assert!(out.join(REVOKED_FILE).exists());
        assert!(
            std::fs::read_to_string(out.join(CA_FILE))
                .unwrap()
                .starts_with("ssh-ed25519 ")
        );
    }

    #[test]
    fn a_bad_answer_leaves_the_old_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &access()).unwrap();
        let before = std::fs::read_to_string(dir.path().join(PRINCIPALS_FILE)).unwrap();
        let mut injected = access();
        injected.principals = vec!["x vma-1\nssh-ed25519 AAAA attacker".into()];
        assert!(write(dir.path(), &injected).is_err());
        let mut no_ca = access();
        no_ca.ca_public_key = None;
        no_ca.principals.clear();
        assert!(write(dir.path(), &no_ca).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(PRINCIPALS_FILE)).unwrap(),
            before
        );
    }

    #[test]
    fn the_drop_in_names_the_three_files() {
        let c = sshd_config("oma-dc1", Path::new("/etc/ssh/tunnelfleet"));
        for line in [
            "TrustedUserCAKeys /etc/ssh/tunnelfleet/ssh_user_ca.pub",
            "AuthorizedPrincipalsFile /etc/ssh/tunnelfleet/principals",
            "RevokedKeys /etc/ssh/tunnelfleet/revoked_keys",
        ] {
            assert!(c.contains(line), "{c}");
        }
    }
}
