//! The two fingerprints operators paste into configs: an SSH host key's (`SHA256:` and base64,
//! as `ssh-keygen -lf` prints it) and the fleet CA certificate's (`SHA256:` and hex, as
//! `tunnelfleet pki init` prints it).

use data_encoding::{BASE64_NOPAD, HEXLOWER};

/// Why a fingerprint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    /// A host key fingerprint without its `SHA256:` prefix.
    #[error("{0:?} must start with \"SHA256:\" (as `ssh-keygen -lf` prints it)")]
    HostKeyPrefix(String),
    /// A host key fingerprint that is not 32 bytes of base64.
    #[error("{0:?} is not a SHA256 fingerprint (43 base64 characters after \"SHA256:\")")]
    HostKeyDigest(String),
    /// A CA fingerprint that is not `SHA256:` and 64 hex digits.
    #[error("{0:?}: expected SHA256: followed by 64 hex digits")]
    Ca(String),
}

/// A pinned host key, as written in `host_key_fingerprints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The one host it belongs to (`host:port SHA256:…`; port 22 when omitted), or None for a
    /// bare `SHA256:…`, which belongs to the profile's endpoints and never to a jump host.
    pub host: Option<(String, u16)>,
    /// `SHA256:…`.
    pub fingerprint: String,
}

/// Why a pin was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// The fingerprint part.
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    /// The host part.
    #[error("{0} (write \"host:port SHA256:…\")")]
    Host(#[from] crate::addr::AddrError),
}

impl Pin {
    /// Whether this pin may vouch for `host:port`: a pin naming a host only for that host; a
    /// bare one for an endpoint of the profile, never for a jump host (a bastion must not be
    /// able to stand in for the OMA behind it, nor the other way round).
    pub fn covers(&self, host: &str, port: u16, jump: bool) -> bool {
        match &self.host {
            Some((h, p)) => h.eq_ignore_ascii_case(host) && *p == port,
            None => !jump,
        }
    }
}

/// Parses `SHA256:…` or `host[:port] SHA256:…`.
pub fn parse_pin(s: &str) -> Result<Pin, PinError> {
    let s = s.trim();
    match s.rsplit_once(char::is_whitespace) {
        None => {
            parse_host_key_fingerprint(s)?;
            Ok(Pin {
                host: None,
                fingerprint: s.to_string(),
            })
        }
        Some((host, fp)) => {
            parse_host_key_fingerprint(fp)?;
            let host = crate::addr::split_host_port(host.trim(), Some(22))?;
            Ok(Pin {
                host: Some(host),
                fingerprint: fp.to_string(),
            })
        }
    }
}

/// Checks the form of a pinned host key fingerprint (`SHA256:` and 43 base64 characters).
pub fn parse_host_key_fingerprint(fp: &str) -> Result<(), FingerprintError> {
    let Some(b64) = fp.strip_prefix("SHA256:") else {
        return Err(FingerprintError::HostKeyPrefix(fp.into()));
    };
    match BASE64_NOPAD.decode(b64.as_bytes()) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(FingerprintError::HostKeyDigest(fp.into())),
    }
}

/// The fleet CA's `SHA256:…` (hex, any case, colons allowed) as 32 bytes.
pub fn parse_ca_fingerprint(s: &str) -> Result<Vec<u8>, FingerprintError> {
    let bad = || FingerprintError::Ca(s.into());
    let hex: String = s
        .trim()
        .strip_prefix("SHA256:")
        .ok_or_else(bad)?
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let bytes = HEXLOWER.decode(hex.as_bytes()).map_err(|_| bad())?;
    if bytes.len() != 32 {
        return Err(bad());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn host_key_fingerprints() {
        let fp = format!("SHA256:{}", BASE64_NOPAD.encode(&[7u8; 32]));
        assert!(parse_host_key_fingerprint(&fp).is_ok());
        assert!(parse_host_key_fingerprint("MD5:aa").is_err());
        // Base64 that decodes, but not to a SHA-256 digest's 32 bytes.
        let short = format!("SHA256:{}", BASE64_NOPAD.encode(&[7u8; 31]));
        assert!(parse_host_key_fingerprint(&short).is_err());
        assert!(parse_host_key_fingerprint("SHA256:short").is_err());
    }

    #[test]
    fn ca_fingerprints_in_any_case_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let want = vec![0xab; 32];
        assert_eq!(
            parse_ca_fingerprint(&format!("SHA256:{hex}")).unwrap(),
            want
        );
        assert_eq!(
            parse_ca_fingerprint(&format!("SHA256:{}", hex.to_uppercase())).unwrap(),
            want
        );
        let colons: Vec<String> = (0..32).map(|_| "ab".to_string()).collect();
        assert_eq!(
            parse_ca_fingerprint(&format!("SHA256:{}", colons.join(":"))).unwrap(),
            want
        );
        assert!(parse_ca_fingerprint(&hex).is_err());
        assert!(parse_ca_fingerprint("SHA256:abcd").is_err());
        assert!(parse_ca_fingerprint(&format!("SHA256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn pins_for_the_endpoints_or_for_one_host() {
        let fp = format!("SHA256:{}", "A".repeat(43));
        let bare = parse_pin(&fp).unwrap();
        assert!(bare.covers("oma-a", 443, false) && !bare.covers("bastion", 22, true));
        let scoped = parse_pin(&format!("bastion.example {fp}")).unwrap();
        assert_eq!(scoped.host, Some(("bastion.example".into(), 22)));
        assert!(scoped.covers("BASTION.example", 22, true));
        assert!(!scoped.covers("bastion.example", 2222, true));
        assert!(!scoped.covers("oma-a", 443, false));
        let v6 = parse_pin(&format!("[fe80::1]:2222 {fp}")).unwrap();
        assert_eq!(v6.host, Some(("fe80::1".into(), 2222)));
        assert!(parse_pin(&format!("a b {fp}")).is_err());
        assert!(parse_pin("oma SHA256:short").is_err());
    }
}
