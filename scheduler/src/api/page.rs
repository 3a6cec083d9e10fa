//! The signup page and dashboard (one HTML file with a little plain
//! JavaScript, no build step), and the subdomain availability check it
//! calls as the customer types.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;

use super::views::{Availability, ErrorBody};
use crate::app::AppRef;
use crate::error::Result;
use crate::lifecycle::instances::{subdomain_available, validate_subdomain};

const PAGE: &str = include_str!("../../assets/index.html");

/// The page's Content-Security-Policy: only its own inline script (by
/// hash) and styles run, and it talks only to this origin (images may be
/// `data:` URLs: the two-factor QR code comes as one).
fn content_security_policy() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(body, _)| body);
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'"
        )
    })
}

#[utoipa::path(get, path = "/", tag = "service",
    responses((status = 200, description = "The signup page and dashboard", content_type = "text/html", body = String)))]
pub async fn index(State(app): State<AppRef>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, content_security_policy()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE.replace("{{BASE_DOMAIN}}", &app.cfg.base_domain),
    )
}

#[utoipa::path(get, path = "/api/subdomains/{name}", tag = "instances",
    params(("name" = String, Path, description = "A subdomain to check")),
    responses(
        (status = 200, description = "Whether the (normalised) name can be taken now", body = Availability),
        (status = 422, description = "Not a valid or allowed name", body = ErrorBody),
    ))]
pub async fn availability(
    State(app): State<AppRef>,
    Path(name): Path<String>,
) -> Result<axum::Json<Availability>> {
    let subdomain = validate_subdomain(&name)?;
    Ok(axum::Json(Availability {
        host: app.cfg.host_of(&subdomain),
        available: subdomain_available(&app, &subdomain).await?,
        subdomain,
    }))
}
