//! The admin bearer token of the routes that change what runs (stage upload and rollback).

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use super::{ApiError, App};

/// `Authorization: Bearer <token>` must match `--admin-token`, compared in constant time; with
/// no token configured, admin routes are off.
pub fn admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.admin_token else {
        return Err(ApiError::Forbidden(
            "admin routes are off: start the server with --admin-token (or STAGEHAND_ADMIN_TOKEN)"
                .into(),
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::Unauthorized("an admin bearer token is required".into()))?;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("wrong admin token".into()))
    }
}
