//! The dashboard at `/`: a page, a script and a stylesheet compiled into the binary, so it works
//! offline and always matches the API it is served with. They hold no data and are public; the
//! data comes from the API with the user's token. A content security policy keeps the page to
//! its own origin (no CDN could be used even by mistake).

use axum::http::header;
use axum::response::{IntoResponse, Response};

const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   frame-ancestors 'none'; form-action 'none'; base-uri 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The binary is the version: a new one may change them.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub async fn page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("assets/dashboard/index.html"),
    )
}

pub async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/dashboard/app.js"),
    )
}

pub async fn stylesheet() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/dashboard/app.css"),
    )
}
