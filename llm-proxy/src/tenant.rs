//! Who is calling: an instance's proxy token (`common::proxy_token`) is
//! checked by deriving it again from the instance's sealed gateway token,
//! and the instance's provider keys are opened from their envelope (the
//! KEK unwraps the instance's data key, which opens each key). The proxy
//! is the only process that opens provider keys. What it learns is kept
//! for `ttl` (30 s by default), so a busy gateway costs no database read
//! per request; a change to an instance's keys, status or container is
//! announced by a trigger (`NOTIFY clawdeploy_tenants`) and drops it at
//! once (`follow_changes`). The TTL bounds it should that channel be down.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clawdeploy_common::proxy_token;
use clawdeploy_common::sealed::{aad, SecretBox};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ProxyError, Result};

/// An authenticated caller.
#[derive(Debug)]
pub struct Tenant {
    pub instance_id: Uuid,
    pub user_id: Uuid,
    /// The account's plan (`free`, `pro`, `team`): its model limits.
    pub tier: String,
    /// The customer's own provider keys, opened: provider → key.
    pub keys: HashMap<String, String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    user_id: Uuid,
    container_id: Uuid,
    gateway_token_enc: Vec<u8>,
    kek_id: Option<String>,
    wrapped_dek: Option<Vec<u8>>,
    tier: String,
}

pub struct Tenants {
    db: PgPool,
    kek: SecretBox,
    ttl: Duration,
    cache: RwLock<HashMap<String, (Arc<Tenant>, Instant)>>,
}

/// Beyond this many cached callers, expired ones are swept on insert.
const SWEEP_ABOVE: usize = 10_000;

impl Tenants {
    pub fn new(db: PgPool, kek: SecretBox, ttl: Duration) -> Self {
        Self {
            db,
            kek,
            ttl,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The tenant `token` belongs to, or `Unauthorized`.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Tenant>> {
        if let Some((t, at)) = self.read().get(token) {
            if at.elapsed() < self.ttl {
                return Ok(t.clone());
            }
        }
        let instance = proxy_token::instance_of(token).ok_or(ProxyError::Unauthorized)?;
        let instance_id = Uuid::parse_str(instance).map_err(|_| ProxyError::Unauthorized)?;
        let tenant = Arc::new(self.load(token, instance_id).await?);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() > SWEEP_ABOVE {
            let ttl = self.ttl;
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
        }
        cache.insert(token.to_owned(), (tenant.clone(), Instant::now()));
        Ok(tenant)
    }

    /// Forgets what is cached of `instance_id`.
    pub fn forget(&self, instance_id: Uuid) {
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (t, _)| t.instance_id != instance_id);
    }

    /// Follows the database's announcements of changed instances for as
    /// long as the process lives, reconnecting after a failure (when the
    /// whole cache is dropped: announcements may have been missed).
    pub async fn follow_changes(self: std::sync::Arc<Self>) {
        let mut backoff =
            clawdeploy_common::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match sqlx::postgres::PgListener::connect_with(&self.db).await {
                Ok(mut l) => match l.listen("clawdeploy_tenants").await {
                    Ok(()) => {
                        self.cache
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .clear();
                        backoff.reset();
                        loop {
                            match l.recv().await {
                                Ok(n) => {
                                    if let Ok(id) = Uuid::parse_str(n.payload()) {
                                        tracing::debug!(instance = %id, "instance changed; forgetting it");
                                        self.forget(id);
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "lost the tenant change feed; reconnecting");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "LISTEN clawdeploy_tenants failed"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot connect for the tenant change feed"),
            }
            backoff.wait().await;
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, (Arc<Tenant>, Instant)>> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    async fn load(&self, token: &str, instance_id: Uuid) -> Result<Tenant> {
        // Only a live instance on its container has a working token; a
        // released one has no container, a suspended one no gateway.
        let row: Option<Row> = sqlx::query_as(
            "SELECT i.user_id, c.id AS container_id, c.gateway_token_enc, k.kek_id, k.wrapped_dek,
                    COALESCE((SELECT b.tier FROM billing_accounts b WHERE b.user_id = i.user_id), 'free') AS tier
               FROM instances i
               JOIN containers c ON c.id = i.container_id
               LEFT JOIN tenant_keys k ON k.instance_id = i.id
              WHERE i.id = $1 AND i.status IN ('pending', 'ready')",
        )
        .bind(instance_id)
        .fetch_optional(&self.db)
        .await?;
        let row = row.ok_or(ProxyError::Unauthorized)?;
        let gateway = self.kek.open_string(
            &aad::gateway_token(row.container_id),
            &row.gateway_token_enc,
        )?;
        if !proxy_token::verify(token, &instance_id.to_string(), &gateway) {
            return Err(ProxyError::Unauthorized);
        }
        let keys = match (row.kek_id, row.wrapped_dek) {
            (Some(kek_id), Some(wrapped)) => self.open_keys(instance_id, &kek_id, &wrapped).await?,
            _ => HashMap::new(),
        };
        Ok(Tenant {
            instance_id,
            user_id: row.user_id,
            tier: row.tier,
            keys,
        })
    }

    async fn open_keys(
        &self,
        instance_id: Uuid,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<HashMap<String, String>> {
        if kek_id != self.kek.id() {
            return Err(ProxyError::Internal(format!(
                "the data key of instance {instance_id} is wrapped by KEK {kek_id}; this proxy holds KEK {}",
                self.kek.id()
            )));
        }
        let dek = SecretBox::from_bytes(&self.kek.open(&aad::data_key(instance_id), wrapped)?)?;
        let sealed: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT name, ciphertext FROM secrets WHERE instance_id = $1")
                .bind(instance_id)
                .fetch_all(&self.db)
                .await?;
        sealed
            .into_iter()
            .map(|(name, ct)| {
                let key = dek.open_string(&aad::secret(instance_id, &name), &ct)?;
                Ok((name, key))
            })
            .collect()
    }
}
