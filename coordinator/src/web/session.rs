//! Sign-in sessions of the fleet page: an admin token traded for a random session id in a
//! `Secure; HttpOnly; SameSite=Strict` cookie. Sessions live in memory (a restart signs
//! everyone out), expire after [`SESSION_TTL`], are bounded in number, and end at once when
//! their token is revoked.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::admin::Caller;

/// How long a sign-in lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Most sessions at once (the oldest goes first).
pub const MAX_SESSIONS: usize = 1024;

/// The cookie's name.
pub const COOKIE: &str = "tf_session";

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who signed in.
    pub caller: Caller,
    /// The SHA-256 of the token it signed in with (named tokens: checked on every request).
    pub token_hash: String,
    /// When it ends.
    pub expires: Instant,
}

/// The sessions, by the SHA-256 of their id (the id itself is only in the browser).
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Starts a session for `caller`; returns the id for the cookie.
    pub fn start(&self, caller: Caller, token_hash: String, now: Instant) -> String {
        let (id, hash, _) = crate::enroll::new_secret("");
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, s| s.expires > now);
        while m.len() >= MAX_SESSIONS {
            let Some(oldest) = m
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            m.remove(&oldest);
        }
        m.insert(
            hash,
            Session {
                caller,
                token_hash,
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// The live session of cookie value `id`.
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let hash = crate::enroll::token_hash(id);
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&hash) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                m.remove(&hash);
                None
            }
            None => None,
        }
    }

    /// Ends the session of cookie value `id`.
    pub fn end(&self, id: &str) {
        let hash = crate::enroll::token_hash(id);
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash);
    }
}

/// The `Set-Cookie` value that signs a browser in.
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Strict",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that signs it out.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict")
}

/// The session id in a request's `Cookie` headers.
pub fn cookie_of(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use crate::store::Role;

    fn viewer() -> Caller {
        Caller {
            name: "grafana".into(),
            role: Role::Viewer,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_lasts_its_ttl_and_ends_when_told() {
        let s = Sessions::default();
        let now = Instant::now();
        let id = s.start(viewer(), "h".into(), now);
        assert_eq!(s.get(&id, now).unwrap().caller, viewer());
        assert!(s.get("other", now).is_none());
        assert!(s.get(&id, now + SESSION_TTL).is_none());
        let id = s.start(viewer(), "h".into(), now);
        s.end(&id);
        assert!(s.get(&id, now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_are_bounded_the_oldest_going_first() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let first = s.start(viewer(), "h".into(), t0);
        for i in 1..=MAX_SESSIONS {
            s.start(viewer(), "h".into(), t0 + Duration::from_millis(i as u64));
        }
        assert!(s.get(&first, t0).is_none());
        assert_eq!(s.inner.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn the_cookie_is_secure_http_only_strict_and_read_back() {
        let c = set_cookie("abc");
        assert!(c.contains("Secure") && c.contains("HttpOnly") && c.contains("SameSite=Strict"));
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            "x=1; tf_session=abc; y=2".parse().unwrap(),
        );
        assert_eq!(cookie_of(&h).as_deref(), Some("abc"));
    }
}
