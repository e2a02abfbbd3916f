//! Addresses and names as operators write them: `host:port`, `[v6]:port`, and the one name
//! rule of profiles, groups, hooks and agent ids.

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Nothing was written.
    #[error("empty address")]
    Empty,
    /// `[` without its `]`.
    #[error("{0:?}: unclosed '['")]
    UnclosedBracket(String),
    /// Something other than `:port` after `]`.
    #[error("{0:?}: expected [host]:port")]
    AfterBracket(String),
    /// An IPv6 literal without brackets.
    #[error("{0:?}: write IPv6 addresses as [addr]:port")]
    BareIpv6(String),
    /// `:port` with no host.
    #[error("{0:?}: the host is empty")]
    EmptyHost(String),
    /// The port is not 1-65535.
    #[error("{text:?}: {port:?} is not a port (1-65535)")]
    BadPort {
        /// The address as written.
        text: String,
        /// The port as written.
        port: String,
    },
    /// A character no host name or address has (whitespace, control characters, or
    /// known_hosts pattern syntax that would change what a recorded line matches).
    #[error("{text:?}: {found:?} cannot be in a host name or address")]
    BadHost {
        /// The address as written.
        text: String,
        /// The first offending character.
        found: char,
    },
    /// No port and no default.
    #[error("{0:?}: expected host:port")]
    MissingPort(String),
}

/// Splits `host:port`, `[v6]:port` or (with a default) a bare host.
pub fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), AddrError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(AddrError::Empty);
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err(AddrError::UnclosedBracket(s.into()));
        };
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(AddrError::AfterBracket(s.into())),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').unwrap_or((s, ""));
        (h, Some(p))
    } else if s.contains(':') {
        return Err(AddrError::BareIpv6(s.into()));
    } else {
        (s, None)
    };
    if host.is_empty() {
        return Err(AddrError::EmptyHost(s.into()));
    }
    // Letters, digits and `-._` for names; `:` and `%zone` for IPv6 literals. Nothing that
    // known_hosts reads as syntax (`,*?!|#@[]` and whitespace) or a terminal would act on.
    if let Some(found) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '%')))
    {
        return Err(AddrError::BadHost {
            text: s.into(),
            found,
        });
    }
    let port = match (port, default_port) {
        (Some(p), _) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(AddrError::BadPort {
                    text: s.into(),
                    port: p.into(),
                });
            }
        },
        (None, Some(d)) => d,
        (None, None) => return Err(AddrError::MissingPort(s.into())),
    };
    Ok((host.to_string(), port))
}

/// `host:port`, with brackets around an IPv6 host, as endpoints are written.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The longest name: profiles, groups, hooks and agent ids alike.
pub const MAX_NAME_LEN: usize = 64;

/// The one name rule of profiles, groups, hooks and agent ids: 1-64 letters, digits, '-', '_',
/// '.'. Names travel in URLs, file names, metric labels and certificate subjects, so nothing
/// that needs quoting in any of them.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A name that broke [`valid_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: use 1-64 letters, digits, '.', '_' or '-'")]
pub struct NameError(pub String);

/// Checks `name` with [`valid_name`].
pub fn check_name(name: &str) -> Result<(), NameError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(NameError(name.into()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("a:1", None).unwrap(), ("a".into(), 1));
        assert_eq!(split_host_port("a", Some(22)).unwrap(), ("a".into(), 22));
        assert_eq!(split_host_port("[::1]:2", None).unwrap(), ("::1".into(), 2));
        assert!(split_host_port("::1:2", None).is_err());
        assert!(split_host_port("a:0", None).is_err());
        assert!(split_host_port("a", None).is_err());
        assert_eq!(join_host_port("::1", 2), "[::1]:2");
        // A bracketed host alone takes the default port; anything else after `]` is refused.
        assert_eq!(
            split_host_port("[::1]", Some(22)).unwrap(),
            ("::1".into(), 22)
        );
        assert!(matches!(
            split_host_port("[::1]x", Some(22)),
            Err(AddrError::AfterBracket(_))
        ));
    }

    /// A host is written into known_hosts (TOFU) and logs: whitespace, control characters and
    /// known_hosts pattern syntax would inject lines or patterns there.
    #[test]
    fn hosts_with_whitespace_or_pattern_characters_are_refused() {
        for bad in [
            "[oma a]:22",
            "[oma\n* ssh-ed25519 AAAA]:22",
            "oma\tb:22",
            "[*]:22",
            "[a,b]:22",
            "|1|x:22",
            "!oma:22",
            "oma?:22",
            "[a@b]:22",
            "oma#:22",
        ] {
            let e = split_host_port(bad, None);
            assert!(
                matches!(e, Err(AddrError::BadHost { .. })),
                "{bad:?}: {e:?}"
            );
        }
        for good in [
            "oma-a.example.com:443",
            "10.0.0.1:22",
            "[fe80::1%eth0]:22",
            "oma_b:2",
        ] {
            split_host_port(good, None).unwrap();
        }
    }

    #[test]
    fn one_name_rule() {
        assert!(valid_name("vma-233.dc_1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(
            check_name("a b")
                .unwrap_err()
                .to_string()
                .contains("use 1-64")
        );
    }
}
