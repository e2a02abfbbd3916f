//! What hooks send: the webhook's JSON body and its HMAC signature, one line of text for chat
//! and email, and Alertmanager's `postableAlerts`.

use crate::store::{Alert, AlertStatus, Delivery};

/// The signature header of the generic webhook: `sha256=<hex HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "x-tunnelfleet-signature";
/// The idempotency key header.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Hex HMAC-SHA256 of `body` under `secret`, as in the signature header after `sha256=`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    // HMAC takes keys of any length.
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(body);
    data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes())
}

/// The webhook's JSON body.
pub fn webhook_body(d: &Delivery) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "idempotency_key": d.idempotency_key,
        "status": d.alert.status.as_str(),
        "alert": d.alert,
    }))
    .unwrap_or_default()
}

/// One line for chat.
pub fn text(a: &Alert) -> String {
    let mark = match a.status {
        AlertStatus::Firing => ":red_circle:",
        AlertStatus::Resolved => ":large_green_circle:",
    };
    let state = a.status.as_str().to_ascii_uppercase();
    let mut t = format!(
        "{mark} {state} [{}] {} (alert {})",
        a.kind.as_str(),
        a.summary,
        a.id
    );
    if !a.affected_agents.is_empty() {
        t.push_str(&format!("; agents: {}", a.affected_agents.join(", ")));
    }
    t
}

/// [`text`] for Slack, escaped as Slack asks (`&`, `<`, `>`): a name like `<!channel>` in an
/// alert is shown, not a mention that pages a whole channel (nor a link, nor a user ping).
pub fn slack_text(a: &Alert) -> String {
    let t = text(a);
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

fn rfc3339(unix_ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Alertmanager v2 `postableAlerts`: labels identify the alert, `endsAt` resolves it.
pub fn alertmanager_body(a: &Alert) -> Vec<u8> {
    let mut alert = serde_json::json!({
        "labels": {
            "alertname": a.kind.as_str(),
            "subject": a.subject,
            "severity": a.kind.severity(),
            "tunnelfleet_alert_id": a.id.to_string(),
            "source": "tunnelfleet",
        },
        "annotations": {
            "summary": a.summary,
            "affected_agents": a.affected_agents.join(","),
        },
        "startsAt": rfc3339(a.fired_unix_ms),
    });
    if let Some(end) = a.resolved_unix_ms {
        alert["endsAt"] = rfc3339(end).into();
    }
    serde_json::to_vec(&[alert]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names in an alert come partly from agents (profile names are checked, but an endpoint or
    /// error text may carry anything): Slack must show them, not act on them.
    #[test]
    fn slack_control_sequences_in_an_alert_are_shown_not_acted_on() {
        let a = Alert {
            id: 7,
            ..Alert::firing(
                crate::store::AlertKind::TunnelHealth,
                "vma-1/oma".into(),
                "health failed: <!channel> <@U123|boss> & <https://evil|click>".into(),
                vec!["<!here>".into()],
            )
        };
        let t = slack_text(&a);
        for raw in ["<!channel>", "<@U123", "<https://", "<!here>"] {
            assert!(!t.contains(raw), "{raw} reached Slack as is: {t}");
        }
        assert!(
            t.contains("&lt;!channel&gt;") && t.contains(" &amp; "),
            "{t}"
        );
    }

    #[test]
    fn signature_matches_a_known_hmac_sha256_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
