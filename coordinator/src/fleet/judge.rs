//! What of an agent's heartbeat counts: only what was pushed to it, its texts made safe to
//! show. An enrolled agent (perhaps a stolen one) reports on what it was given, nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tunnelfleet_protocol::{Heartbeat, ProfileSet};

/// Profile name -> the endpoints it was pushed with.
pub type Given = BTreeMap<String, BTreeSet<String>>;

/// What a pushed set gives an agent to report on.
pub fn given(set: &ProfileSet) -> Arc<Given> {
    Arc::new(
        set.profiles
            .iter()
            .map(|p| (p.name.clone(), p.endpoints.iter().cloned().collect()))
            .collect(),
    )
}

/// What of an agent's heartbeat counts: only profiles pushed to it, each only when it runs on
/// an endpoint it was given, with only the error counters and moves of those endpoints. An
/// enrolled agent (perhaps a stolen one) can report on what it was given, nothing else: no
/// alerts under invented names, no evidence against endpoints it never had.
pub fn judged(hb: &Heartbeat, given: &Given) -> Heartbeat {
    let profiles = hb
        .profiles
        .iter()
        .filter_map(|p| {
            let eps = given.get(&p.name)?;
            if !eps.contains(&p.active_endpoint) {
                return None;
            }
            let mut p = p.clone();
            p.errors.retain(|e| eps.contains(&e.endpoint));
            p.failover_log
                .retain(|f| eps.contains(&f.from) && eps.contains(&f.to));
            // Its words reach alerts, events, logs and terminals: shown, never acted on.
            clean(&mut p.last_error);
            for h in &mut p.health {
                h.detail = clean_text(&h.detail, false, MAX_TEXT);
            }
            for f in &mut p.forwards {
                clean(&mut f.detail);
            }
            for e in &mut p.errors {
                e.last_detail = clean_text(&e.last_detail, false, MAX_TEXT);
            }
            for f in &mut p.failover_log {
                f.reason = clean_text(&f.reason, false, MAX_TEXT);
            }
            Some(p)
        })
        .collect();
    Heartbeat {
        seq: hb.seq,
        sent_unix_ms: hb.sent_unix_ms,
        profiles,
    }
}

/// The longest free text kept from an agent's report (an error, a health detail).
pub const MAX_TEXT: usize = 512;

/// Text an agent wrote, made safe to show: control characters (escape sequences a terminal
/// would act on, newlines that would forge log lines — kept when `lines`) written out as
/// `\u{..}`, and at most `max` characters ([`MAX_TEXT`] for a report's texts).
pub fn clean_text(s: &str, lines: bool, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() && !(lines && c == '\n') {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn clean(s: &mut Option<String>) {
    if let Some(t) = s {
        *t = clean_text(t, false, MAX_TEXT);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.
    use super::*;

    /// What an agent writes is shown, not acted on: escape sequences and forged log lines in
    /// its error texts are written out, and long texts cut.
    #[test]
    fn agent_text_is_cleaned_before_anything_shows_it() {
        let mut given = Given::new();
        given.insert("oma".into(), ["oma-a:443".to_string()].into());
        let report = tunnelfleet_protocol::ProfileReport {
            last_error: Some("refused\u{1b}[2J\n2026-12-01 ERROR forged line".into()),
            ..tunnelfleet_protocol::ProfileReport::new(
                "oma",
                tunnelfleet_protocol::TunnelState::Up,
                "oma-a:443",
            )
        };
        let long = tunnelfleet_protocol::ProfileReport {
            last_error: Some("x".repeat(10_000)),
            ..report.clone()
        };
        for (r, check) in [(report, 0), (long, 1)] {
            let hb = Heartbeat {
                seq: 1,
                sent_unix_ms: 0,
                profiles: vec![r],
            };
            let e = judged(&hb, &given).profiles[0].last_error.clone().unwrap();
            if check == 0 {
                assert!(!e.contains('\u{1b}') && !e.contains('\n'), "{e:?}");
                assert!(
                    e.contains("\\u{1b}[2J") && e.contains("forged line"),
                    "{e:?}"
                );
            } else {
                assert!(e.chars().count() <= MAX_TEXT + 1, "{}", e.len());
            }
        }
    }
}
