//! What an OMA's sshd must say about the fleet's agents, worked out without IO: the lines of its
//! `AuthorizedPrincipalsFile` and its `RevokedKeys` list. `tunnelfleet oma sync` fetches both
//! from the admin API and writes them on the OMA.
//!
//! An OpenSSH certificate carries no port limits, so the principal's line does: an agent whose
//! profiles of a group log in by certificate gets `restrict,port-forwarding` with a
//! `permitopen` for each `L` target and a `permitlisten` for each `R` listen address of those
//! profiles, and nothing else. A `D` forward opens whatever its SOCKS clients ask for, so an
//! agent with one gets no `permitopen` limit (said in the line's comment). A revoked agent has
//! no line, and its certified key is listed as revoked, so sshd refuses it even where an old
//! principals file still names it.

use std::collections::{BTreeMap, BTreeSet};

use tunnelfleet_protocol::ProfileSet;
use tunnelfleet_protocol::forward::ForwardSpec;

/// sshd's principal options have no `none`: an agent with no `L` forward gets this one
/// destination instead, the broadcast address, which no TCP connection reaches.
pub const NO_OPEN: &str = "255.255.255.255:1";

/// ... and one with no `R` forward this one listen address: a privileged port, which the
/// tunnel account (not root) cannot bind.
pub const NO_LISTEN: &str = "127.0.0.1:1";

/// One agent as the rule sees it: what it runs now and whether it is revoked.
#[derive(Debug, Clone)]
pub struct AgentAccess<'a> {
    /// The agent id (its certificate's principal).
    pub id: &'a str,
    /// The profiles it runs at this fleet version (resolved: a group's endpoints filled in).
    pub set: &'a ProfileSet,
}

/// The principals file of group `group`: one line per agent (by id) with a certificate
/// profile of that group, sorted, revoked agents left out.
pub fn principals(
    group: &str,
    agents: &[AgentAccess<'_>],
    revoked: &BTreeSet<String>,
) -> Vec<String> {
    let mut lines: BTreeMap<&str, String> = BTreeMap::new();
    for a in agents {
        if revoked.contains(a.id) {
            continue;
        }
        let mut opens = BTreeSet::new();
        let mut listens = BTreeSet::new();
        let mut dynamic = false;
        let mut any = false;
        for p in a
            .set
            .profiles
            .iter()
            .filter(|p| p.group.as_deref() == Some(group) && p.identity_file.is_none())
        {
            any = true;
            for f in &p.forwards {
                match ForwardSpec::parse(f) {
                    Ok(ForwardSpec::Local {
                        host, host_port, ..
                    }) => {
                        opens.insert(host_port_of(&host, &host_port.to_string()));
                    }
                    Ok(ForwardSpec::Remote { bind, port, .. }) => {
                        let port = if port == 0 {
                            "*".to_string()
                        } else {
                            port.to_string()
                        };
                        listens.insert(host_port_of(&bind, &port));
                    }
                    Ok(ForwardSpec::Dynamic { .. }) => dynamic = true,
                    // Validated when stored; a forward that does not parse opens nothing.
                    Err(_) => {}
                }
            }
        }
        if !any {
            continue;
        }
        let mut options = vec!["restrict".to_string(), "port-forwarding".to_string()];
        if !dynamic {
            if opens.is_empty() {
                opens.insert(NO_OPEN.to_string());
            }
            options.extend(opens.iter().map(|o| format!("permitopen=\"{o}\"")));
        }
        if listens.is_empty() {
            listens.insert(NO_LISTEN.to_string());
        }
        options.extend(listens.iter().map(|l| format!("permitlisten=\"{l}\"")));
        // sshd takes the last word of a line as the principal: a note goes on a line of its own.
        let note = if dynamic {
            format!("# {}: a D forward, which opens any destination\n", a.id)
        } else {
            String::new()
        };
        lines.insert(a.id, format!("{note}{} {}", options.join(","), a.id));
    }
    lines
        .into_values()
        .flat_map(|l| l.lines().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// `host:port` as sshd's options write it (an IPv6 address in brackets).
fn host_port_of(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use tunnelfleet_protocol::ProfileSpec;

    fn profile(name: &str, group: &str, forwards: &[&str], key: bool) -> ProfileSpec {
        let mut p = ProfileSpec::new(name, "vma", "/k");
        if !key {
            p.identity_file = None;
        }
        p.group = Some(group.into());
        p.endpoints = vec!["oma-a:443".into()];
        p.forwards = forwards.iter().map(|f| f.to_string()).collect();
        p
    }

    fn set(profiles: Vec<ProfileSpec>) -> ProfileSet {
        ProfileSet {
            version: 1,
            profiles,
        }
    }

    #[test]
    fn a_line_opens_exactly_the_ports_of_the_agents_certificate_profiles_of_the_group() {
        let seed = set(vec![
            profile(
                "oma",
                "oma-dc1",
                &[
                    "L 8082:localhost:8082",
                    "L 10809:localhost:10809",
                    "L 10808:localhost:10809",
                    "R 9081:localhost:8081",
                ],
                false,
            ),
            // Another group's profile, and one with a key file: neither counts here.
            profile("other", "oma-dc2", &["L 1:elsewhere:1"], false),
            profile("keyed", "oma-dc1", &["L 2:keyed:2"], true),
        ]);
        let agents = [AgentAccess {
            id: "vma-233",
            set: &seed,
        }];
        assert_eq!(
            principals("oma-dc1", &agents, &BTreeSet::new()),
            [
                "restrict,port-forwarding,permitopen=\"localhost:10809\",permitopen=\"localhost:8082\",permitlisten=\"localhost:9081\" vma-233"
            ]
        );
        assert_eq!(
            principals("oma-dc2", &agents, &BTreeSet::new()),
            [
                "restrict,port-forwarding,permitopen=\"elsewhere:1\",permitlisten=\"127.0.0.1:1\" vma-233"
            ]
        );
        assert!(principals("oma-dc3", &agents, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn revoked_agents_get_no_line_and_the_rest_are_sorted() {
        let a = set(vec![profile("oma", "g", &["L 1:h:1"], false)]);
        let agents = [
            AgentAccess {
                id: "vma-b",
                set: &a,
            },
            AgentAccess {
                id: "vma-a",
                set: &a,
            },
            AgentAccess {
                id: "vma-c",
                set: &a,
            },
        ];
        let revoked = BTreeSet::from(["vma-c".to_string()]);
        let lines = principals("g", &agents, &revoked);
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].ends_with(" vma-a") && lines[1].ends_with(" vma-b"),
            "{lines:?}"
        );
    }

    #[test]
    fn remote_only_dynamic_and_ipv6_forwards() {
        let r = set(vec![profile(
            "oma",
            "g",
            &[
                "R 127.0.0.1:9081:localhost:8081",
                "R 0:localhost:22",
                "L 5:[::1]:5",
            ],
            false,
        )]);
        let d = set(vec![profile("oma", "g", &["D 1080"], false)]);
        let lines = principals(
            "g",
            &[
                AgentAccess {
                    id: "vma-r",
                    set: &r,
                },
                AgentAccess {
                    id: "vma-d",
                    set: &d,
                },
            ],
            &BTreeSet::new(),
        );
        assert_eq!(
            lines,
            [
                "# vma-d: a D forward, which opens any destination",
                "restrict,port-forwarding,permitlisten=\"127.0.0.1:1\" vma-d",
                "restrict,port-forwarding,permitopen=\"[::1]:5\",permitlisten=\"127.0.0.1:9081\",permitlisten=\"localhost:*\" vma-r",
            ]
        );
    }
}
