//! Node enrollment: one-time join tokens an operator creates for a named
//! node, spending one to join (a token and a CSR for a short-lived
//! certificate), and renewing a node's certificate before it expires.
//! Removed nodes get nothing. The gRPC service is `rpc::enroll`.

use std::time::Duration;

use clawdeploy_proto::NodeCertificate;
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::audit::audit;
use crate::crypto::pki::{valid_id, Identity};
use crate::crypto::random_token;
use crate::error::{Error, Result};
use crate::model::NodeState;

/// What an operator hands to a new node: the token and the CA pin.
#[derive(Debug)]
pub struct JoinToken {
    pub token: String,
    pub ca_pin: String,
    pub node_id: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Creates a one-time token for `node_id`, valid for `ttl`. A removed node's
/// id cannot be reused.
pub async fn create_token(
    app: &App,
    node_id: &str,
    ttl: Duration,
    actor: &str,
) -> Result<JoinToken> {
    if !valid_id(node_id) {
        return Err(Error::Invalid {
            field: "nodeId",
            message: "1-63 letters, digits, '-' or '_'".into(),
        });
    }
    if ttl.is_zero() || ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(Error::Invalid {
            field: "ttlSecs",
            message: "between 1 second and 7 days".into(),
        });
    }
    let state: Option<NodeState> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
        .bind(node_id)
        .fetch_optional(&app.db)
        .await?;
    if state == Some(NodeState::Removed) {
        return Err(Error::Conflict {
            code: "node_removed",
            message: format!("node {node_id} was removed; join the machine under a new id"),
        });
    }
    let (id, secret) = (random_token(6), random_token(24));
    let expires_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "INSERT INTO join_tokens (id, secret_hash, node_id, created_by, expires_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING expires_at",
    )
    .bind(&id)
    .bind(secret_hash(&secret))
    .bind(node_id)
    .bind(actor)
    .bind(ttl.as_secs_f64())
    .fetch_one(&app.db)
    .await?;
    audit(
        &app.db,
        actor,
        "node.join_token",
        node_id,
        serde_json::json!({"tokenId": id, "expiresAt": expires_at}),
    )
    .await;
    Ok(JoinToken {
        token: format!("{id}.{secret}"),
        ca_pin: app.ca.pin(),
        node_id: node_id.to_owned(),
        expires_at,
    })
}

/// Spends a token for `node_id`: true only for a known, unexpired, unused
/// token whose secret matches and which was made for that node. Every other
/// case looks the same to the caller; the log says which it was.
async fn spend_token(app: &App, token: &str, node_id: &str) -> Result<()> {
    let refused = || Error::Unauthenticated;
    let (id, secret) = token.split_once('.').ok_or_else(refused)?;
    let mut tx = app.db.begin().await?;
    #[derive(sqlx::FromRow)]
    struct Stored {
        secret_hash: Vec<u8>,
        node_id: String,
        used: bool,
        expired: bool,
    }
    let row: Option<Stored> = sqlx::query_as(
        "SELECT secret_hash, node_id, used_at IS NOT NULL AS used, expires_at <= now() AS expired
           FROM join_tokens WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let reason = match &row {
        None => Some("unknown token"),
        Some(t) if !constant_time_eq(&t.secret_hash, &secret_hash(secret)) => Some("wrong secret"),
        Some(t) if t.used => Some("already used"),
        Some(t) if t.expired => Some("expired"),
        Some(t) if t.node_id != node_id => Some("made for another node"),
        Some(_) => None,
    };
    if let Some(reason) = reason {
        tracing::warn!(token_id = id, node_id, reason, "join refused");
        metrics::counter!("clawdeploy_node_joins_total", "result" => "refused").increment(1);
        return Err(refused());
    }
    sqlx::query("UPDATE join_tokens SET used_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Issues a node certificate and records its serial and expiry. Refuses
/// removed nodes; creates the node row on first join.
async fn certify(app: &App, node_id: &str, csr_der: &[u8]) -> Result<NodeCertificate> {
    let state: Option<NodeState> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
        .bind(node_id)
        .fetch_optional(&app.db)
        .await?;
    if state == Some(NodeState::Removed) {
        return Err(Error::Forbidden(format!("node {node_id} has been removed")));
    }
    let signed = app.ca.sign_csr(
        csr_der,
        &Identity::Node(node_id.to_owned()),
        app.cfg.node_cert_lifetime,
    )?;
    sqlx::query(
        "INSERT INTO nodes (id, name, cert_serial, cert_not_after, state)
         VALUES ($1, $1, $2, to_timestamp($3), 'active')
         ON CONFLICT (id) DO UPDATE SET cert_serial = EXCLUDED.cert_serial, cert_not_after = EXCLUDED.cert_not_after",
    )
    .bind(node_id)
    .bind(&signed.serial)
    .bind(signed.not_after_unix as f64)
    .execute(&app.db)
    .await?;
    Ok(NodeCertificate {
        node_id: node_id.to_owned(),
        cert_pem: signed.cert_pem,
        ca_pem: app.ca.cert_pem().to_owned(),
        not_after_unix: signed.not_after_unix,
    })
}

/// Joins a node: spends its token, issues its first certificate.
pub async fn join(
    app: &App,
    node_id: &str,
    token: &str,
    csr_der: &[u8],
) -> Result<NodeCertificate> {
    if !valid_id(node_id) {
        return Err(Error::Invalid {
            field: "node_id",
            message: "1-63 letters, digits, '-' or '_'".into(),
        });
    }
    spend_token(app, token, node_id).await?;
    let cert = certify(app, node_id, csr_der).await?;
    metrics::counter!("clawdeploy_node_joins_total", "result" => "ok").increment(1);
    audit(
        &app.db,
        &format!("node:{node_id}"),
        "node.join",
        node_id,
        serde_json::json!({"certNotAfter": cert.not_after_unix}),
    )
    .await;
    tracing::info!(node_id, "node joined");
    Ok(cert)
}

/// Renews a node's certificate (called with its current one).
pub async fn renew(app: &App, node_id: &str, csr_der: &[u8]) -> Result<NodeCertificate> {
    let cert = certify(app, node_id, csr_der).await?;
    metrics::counter!("clawdeploy_node_cert_renewals_total").increment(1);
    tracing::info!(
        node_id,
        not_after = cert.not_after_unix,
        "node certificate renewed"
    );
    Ok(cert)
}
