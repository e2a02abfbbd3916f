//! Who is calling and whether they may: the bearer token (the `admin_token_file`'s, an `admin`,
//! or a named one from the store with its role), the role each route needs, and the audit entry
//! of every request beyond a viewer's (every change, refused or not, and the admin-only reads),
//! durable before the answer.
//!
//! The rule is one table, [`required_role`]: a read (`GET`, and `POST /v1/plan`, which changes
//! nothing) needs `viewer`, the operator's actions are listed, and every other change needs
//! `admin`, so a route added without a thought is an admin's.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Admin;
use super::error::ApiError;
use crate::store::{AuditEntry, Role};

/// The name the `admin_token_file`'s token is known by in the audit log.
pub const FILE_TOKEN_NAME: &str = "admin_token_file";

/// The caller of a request, put in its extensions for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// The role a route needs, by method and route template.
pub fn required_role(method: &Method, route: &str) -> Role {
    if method == Method::GET || method == Method::HEAD {
        return match route {
            // Who holds which token is for admins only.
            "/v1/admin-tokens" => Role::Admin,
            _ => Role::Viewer,
        };
    }
    match (method.as_str(), route) {
        ("POST", "/v1/plan") => Role::Viewer,
        ("POST", "/v1/agents/{id}/tunnels/{profile}/{action}")
        | ("POST", "/v1/agents/{id}/net-check")
        | ("POST", "/v1/agents/{id}/audit")
        | ("POST", "/v1/alerts/{id}/ack")
        | ("POST", "/v1/silences")
        | ("POST", "/v1/groups/{name}/failover")
        | ("POST", "/v1/groups/{name}/failback")
        | ("POST", "/v1/oma/drain")
        | ("POST", "/v1/oma/undrain")
        | ("POST", "/v1/rollouts/current/resume")
        | ("POST", "/v1/rollouts/current/abort") => Role::Operator,
        _ => Role::Admin,
    }
}

/// The caller a bearer token stands for, if any (the fleet page's sign-in uses it too).
pub(crate) fn caller(admin: &Admin, given: &str) -> Result<Option<Caller>, ApiError> {
    // The file's token, compared without an early exit so timing does not reveal it.
    let want = admin.token.as_bytes();
    let same = given.len() == want.len()
        && given
            .as_bytes()
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        return Ok(Some(Caller {
            name: FILE_TOKEN_NAME.into(),
            role: Role::Admin,
        }));
    }
    if given.is_empty() {
        return Ok(None);
    }
    // Named tokens are looked up by the hash of the secret: nothing to compare byte by byte.
    let hash = crate::enroll::token_hash(given);
    Ok(admin.fleet.store.admin_token(&hash)?.map(|t| Caller {
        name: t.name,
        role: t.role,
    }))
}

/// Largest request body an audited route takes (a profile set is far smaller).
const MAX_AUDITED_BODY: usize = 1 << 20;

/// How much of a request the audit entry keeps.
const REQUEST_SUMMARY: usize = 240;

/// Every admin request carries `Authorization: Bearer <token>`, checked before its handler runs
/// (and before its body is read); then the route's role; then, for a change, the audit entry
/// is written (durably) before the answer goes out — refusals of known tokens included.
pub(super) async fn authorize(State(admin): State<Admin>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
        .to_string();
    let who = match caller(&admin, &given) {
        Ok(Some(c)) => c,
        Ok(None) => {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing, wrong or revoked bearer token".into(),
            )
            .into_response();
        }
        Err(e) => return e.into_response(),
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let need = required_role(req.method(), &route);
    if need == Role::Viewer {
        let mut req = req;
        req.extensions_mut().insert(who);
        return next.run(req).await;
    }
    // A change: read the body (bounded) for the audit entry, then run it.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_AUDITED_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_AUDITED_BODY} bytes, or cut short"),
            )
            .into_response();
        }
    };
    let request = summary(&parts.method, &parts.uri, &bytes);
    let resp = if who.role < need {
        ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}; {} {} needs {need}",
                who.name, who.role, parts.method, route
            ),
        )
        .into_response()
    } else {
        let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
        req.extensions_mut().insert(who.clone());
        next.run(req).await
    };
    let status = resp.status();
    let (resp, result) = if status.is_success() {
        (resp, "ok".to_string())
    } else {
        error_of(resp).await
    };
    let entry = AuditEntry {
        seq: 0,
        at_unix_ms: tunnelfleet_runtime::clock::now_unix_ms(),
        token: who.name.clone(),
        role: who.role,
        request,
        status: status.as_u16(),
        result,
    };
    tracing::info!(
        target: "tunnelfleet::audit",
        token = %entry.token,
        role = %entry.role,
        request = %entry.request,
        status = entry.status,
        result = %entry.result,
        "admin change"
    );
    if let Err(e) = admin.fleet.store.audit(entry).await {
        // The change itself is durable already; say so rather than hide it.
        tracing::error!("audit log: {e}");
        return ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change was made ({status}) but its audit entry was not written: {e}"),
        )
        .into_response();
    }
    resp
}

/// The request in short: method, path and query, and the body's first bytes on one line.
fn summary(method: &Method, uri: &axum::http::Uri, body: &[u8]) -> String {
    let mut s = format!("{method} {uri}");
    if !body.is_empty() {
        let text = String::from_utf8_lossy(body);
        let one_line: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let one_line = one_line.split_whitespace().collect::<Vec<_>>().join(" ");
        s.push(' ');
        s.push_str(&one_line);
    }
    if s.chars().count() > REQUEST_SUMMARY {
        s = s.chars().take(REQUEST_SUMMARY - 1).collect();
        s.push('…');
    }
    s
}

/// The error message of an error answer (`{"error": …}`), and the answer rebuilt.
async fn error_of(resp: Response) -> (Response, String) {
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
    (
        Response::from_parts(parts, axum::body::Body::from(bytes)),
        msg,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_need_a_viewer_actions_an_operator_and_the_rest_an_admin() {
        assert_eq!(required_role(&Method::GET, "/v1/agents"), Role::Viewer);
        assert_eq!(required_role(&Method::POST, "/v1/plan"), Role::Viewer);
        assert_eq!(
            required_role(&Method::POST, "/v1/groups/{name}/failover"),
            Role::Operator
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/alerts/{id}/ack"),
            Role::Operator
        );
        assert_eq!(
            required_role(&Method::PUT, "/v1/profiles/{name}"),
            Role::Admin
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/agents/{id}/revoke"),
            Role::Admin
        );
        assert_eq!(required_role(&Method::GET, "/v1/admin-tokens"), Role::Admin);
        // A route nobody listed is an admin's.
        assert_eq!(required_role(&Method::POST, "/v1/new-thing"), Role::Admin);
        assert_eq!(required_role(&Method::DELETE, "/v1/silences"), Role::Admin);
    }

    #[test]
    fn a_summary_is_one_short_line() {
        let uri: axum::http::Uri = "/v1/profiles/oma?x=1".parse().unwrap_or_default();
        let s = summary(&Method::PUT, &uri, b"{\n  \"name\": \"oma\",\n\t\"x\": 1 }");
        assert_eq!(
            s,
            "PUT /v1/profiles/oma?x=1 { \"name\": \"oma\", \"x\": 1 }"
        );
        let long = summary(&Method::PUT, &uri, &[b'a'; 1000]);
        assert_eq!(long.chars().count(), REQUEST_SUMMARY);
        assert!(long.ends_with('…'));
    }
}
