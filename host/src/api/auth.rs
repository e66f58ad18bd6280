//! Bearer tokens, as axum middleware over groups of routes.
//!
//! - The **admin token** guards what changes what runs or what was decided (stage upload,
//!   rollback, promote, kv reload, dead-letter discard and reprocess). Without one configured the
//!   admin routes are off (403): an operator has to opt in to remote changes.
//! - The optional **API token** guards every other route, `/metrics` included; the admin token is
//!   accepted wherever the API token is. Without one those routes are open (a loopback-only or
//!   proxied deployment).
//!
//! Tokens come in `Authorization: Bearer <token>`. A browser's `EventSource` cannot set headers,
//! so safe requests (GET/HEAD) may carry the token in the `stagehand_token` cookie instead; a
//! cookie never authorizes a change, so a forged cross-site POST gets nothing from it.
//! Comparisons are constant-time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiError, App};

/// The cookie the dashboard sets so that its `EventSource` streams are authorized.
pub const TOKEN_COOKIE: &str = "stagehand_token";

/// The configured tokens; empty strings count as none.
#[derive(Clone, Default)]
pub struct Tokens {
    pub admin: Option<String>,
    pub api: Option<String>,
}

impl Tokens {
    pub fn new(admin: Option<String>, api: Option<String>) -> Self {
        let set = |token: Option<String>| token.filter(|t| !t.is_empty());
        Tokens {
            admin: set(admin),
            api: set(api),
        }
    }
}

/// Middleware of the routes any client may use once it has the API token.
pub async fn require_api_token(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let tokens = &app.tokens;
    if let Some(api) = &tokens.api {
        let cookie_allowed = matches!(*request.method(), Method::GET | Method::HEAD);
        let given = presented(request.headers(), cookie_allowed).ok_or_else(|| {
            ApiError::Unauthorized("a bearer token is required (the server has --api-token)".into())
        })?;
        let admin = tokens.admin.as_deref().is_some_and(|a| same(given, a));
        if !same(given, api) && !admin {
            return Err(ApiError::Unauthorized("wrong token".into()));
        }
    }
    Ok(next.run(request).await)
}

/// Middleware of the admin routes.
pub async fn require_admin_token(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(admin) = &app.tokens.admin else {
        return Err(ApiError::Forbidden(
            "admin routes are off: start the server with --admin-token (or STAGEHAND_ADMIN_TOKEN)"
                .into(),
        ));
    };
    let given = presented(request.headers(), false)
        .ok_or_else(|| ApiError::Unauthorized("an admin bearer token is required".into()))?;
    if !same(given, admin) {
        return Err(ApiError::Unauthorized("wrong admin token".into()));
    }
    Ok(next.run(request).await)
}

/// The token of a request: its bearer header, else (when allowed) its cookie.
fn presented(headers: &HeaderMap, cookie_allowed: bool) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some() || !cookie_allowed {
        return bearer;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value)
}

/// Constant-time in the contents; only the length may leak, as with any such comparison.
fn same(given: &str, expected: &str) -> bool {
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_counts_only_where_allowed_and_the_header_wins() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "theme=dark; stagehand_token=from-cookie".parse().unwrap(),
        );
        assert_eq!(presented(&headers, true), Some("from-cookie"));
        assert_eq!(presented(&headers, false), None);
        headers.insert(header::AUTHORIZATION, "Bearer from-header".parse().unwrap());
        assert_eq!(presented(&headers, true), Some("from-header"));
        assert_eq!(presented(&headers, false), Some("from-header"));
    }

    #[test]
    fn tokens_must_match_exactly() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("ab", "abc"));
        assert!(!same("", "abc"));
    }
}
