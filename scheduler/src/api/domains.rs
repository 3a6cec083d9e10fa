//! `/api/instances/me/domains`: a customer's own hostnames and the DNS
//! records that prove and point them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::extract::{ApiJson, AuthUser};
use super::views::{DomainEnvelope, DomainList, DomainView, ErrorBody, RecordView};
use crate::app::{App, AppRef};
use crate::domains::{self, Domain};
use crate::error::Result;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDomain {
    #[schema(max_length = 253)]
    hostname: String,
}

fn view(app: &App, d: Domain, subdomain: &str) -> DomainView {
    let records = domains::records(app, &d, subdomain)
        .into_iter()
        .map(|r| RecordView {
            kind: r.kind,
            name: r.name,
            value: r.value,
        })
        .collect();
    DomainView {
        hostname: d.hostname,
        state: d.state,
        reason: d.reason,
        certificate_not_after: d.cert_not_after,
        records,
    }
}

/// Adds a custom hostname; the answer lists the DNS records to create.
#[utoipa::path(post, path = "/api/instances/me/domains", tag = "instances", request_body = NewDomain, security(("bearer" = [])),
    responses(
        (status = 201, description = "Added, waiting for its DNS records", body = DomainEnvelope),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The plan has no custom domains (plan_required), or the account's email address is not verified yet (email_unverified)", body = ErrorBody),
        (status = 404, description = "No live instance", body = ErrorBody),
        (status = 409, description = "Already here, claimed by another account, or the limit reached", body = ErrorBody),
        (status = 422, description = "Not an acceptable hostname", body = ErrorBody),
    ))]
pub async fn add(
    State(app): State<AppRef>,
    user: AuthUser,
    ApiJson(body): ApiJson<NewDomain>,
) -> Result<(StatusCode, axum::Json<DomainEnvelope>)> {
    let (domain, subdomain) = domains::add(&app, user.id, &body.hostname).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(DomainEnvelope {
            domain: view(&app, domain, &subdomain),
        }),
    ))
}

#[utoipa::path(get, path = "/api/instances/me/domains", tag = "instances", security(("bearer" = [])),
    responses(
        (status = 200, description = "The instance's custom domains with their state", body = DomainList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No live instance", body = ErrorBody),
    ))]
pub async fn list(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<DomainList>> {
    let (list, subdomain) = domains::list(&app, user.id).await?;
    Ok(axum::Json(DomainList {
        domains: list
            .into_iter()
            .map(|d| view(&app, d, &subdomain))
            .collect(),
    }))
}

#[utoipa::path(delete, path = "/api/instances/me/domains/{hostname}", tag = "instances", security(("bearer" = [])),
    params(("hostname" = String, Path, description = "The custom hostname")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such domain on the caller's instance", body = ErrorBody),
    ))]
pub async fn remove(
    State(app): State<AppRef>,
    user: AuthUser,
    Path(hostname): Path<String>,
) -> Result<StatusCode> {
    domains::remove(&app, user.id, &hostname).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks the domain's DNS records now.
#[utoipa::path(post, path = "/api/instances/me/domains/{hostname}/verify", tag = "instances", security(("bearer" = [])),
    params(("hostname" = String, Path, description = "The custom hostname")),
    responses(
        (status = 200, description = "The domain after the check (`verified`, or its reason)", body = DomainEnvelope),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such domain on the caller's instance", body = ErrorBody),
        (status = 503, description = "DNS checks are off or the nameservers did not answer", body = ErrorBody),
    ))]
pub async fn verify(
    State(app): State<AppRef>,
    user: AuthUser,
    Path(hostname): Path<String>,
) -> Result<axum::Json<DomainEnvelope>> {
    let (domain, subdomain) = domains::verify(&app, user.id, &hostname).await?;
    Ok(axum::Json(DomainEnvelope {
        domain: view(&app, domain, &subdomain),
    }))
}
