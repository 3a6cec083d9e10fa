//! Envelope encryption of customers' provider keys. Each instance gets its
//! own data key (DEK); only the DEK wrapped by the key-encryption key (KEK,
//! outside the database) is stored, with the KEK's id. Provider keys are
//! sealed under the DEK with associated data binding instance and field.
//! Rotating the KEK re-wraps the DEKs (and re-seals what the KEK seals
//! directly: gateway tokens, stored idempotent answers) in one transaction;
//! no customer key is decrypted for it.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::aad::{self, data_key as dek_aad};
use super::SecretBox;
use crate::error::{Error, Result};

/// A `tenant_keys` row: an instance's data key, wrapped by the KEK `kek_id`.
#[derive(sqlx::FromRow)]
struct WrappedKey {
    instance_id: Uuid,
    kek_id: String,
    wrapped_dek: Vec<u8>,
}

fn unwrap(kek: &SecretBox, instance_id: Uuid, kek_id: &str, wrapped: &[u8]) -> Result<SecretBox> {
    if kek_id != kek.id() {
        return Err(Error::Internal(format!(
            "the data key of instance {instance_id} is wrapped by KEK {kek_id}; this scheduler holds KEK {}",
            kek.id()
        )));
    }
    Ok(SecretBox::from_bytes(
        &kek.open(&dek_aad(instance_id), wrapped)?,
    )?)
}

/// A new data key for an instance, not yet stored: the key to seal with
/// and the `tenant_keys` row that keeps it (wrapped by the KEK).
pub struct FreshKey {
    pub dek: SecretBox,
    pub kek_id: String,
    pub wrapped_dek: Vec<u8>,
}

/// A new data key for `instance_id`; the caller stores `wrapped_dek` under
/// `kek_id` in `tenant_keys` in the transaction that creates the instance.
pub fn fresh(kek: &SecretBox, instance_id: Uuid) -> Result<FreshKey> {
    let (key, dek) = SecretBox::generate()?;
    Ok(FreshKey {
        dek,
        kek_id: kek.id().to_owned(),
        wrapped_dek: kek.seal(&dek_aad(instance_id), &key)?,
    })
}

/// A new data key for `instance_id`, stored wrapped (inside the caller's
/// transaction).
pub async fn create(
    kek: &SecretBox,
    tx: &mut PgConnection,
    instance_id: Uuid,
) -> Result<SecretBox> {
    let key = fresh(kek, instance_id)?;
    sqlx::query("INSERT INTO tenant_keys (instance_id, kek_id, wrapped_dek) VALUES ($1, $2, $3)")
        .bind(instance_id)
        .bind(&key.kek_id)
        .bind(&key.wrapped_dek)
        .execute(&mut *tx)
        .await?;
    Ok(key.dek)
}

/// The data key of each of `instance_ids` that has one.
pub async fn load(
    kek: &SecretBox,
    db: &mut PgConnection,
    instance_ids: &[Uuid],
) -> Result<HashMap<Uuid, SecretBox>> {
    let rows: Vec<WrappedKey> = sqlx::query_as(
        "SELECT instance_id, kek_id, wrapped_dek FROM tenant_keys WHERE instance_id = ANY($1)",
    )
    .bind(instance_ids)
    .fetch_all(&mut *db)
    .await?;
    rows.into_iter()
        .map(|k| {
            let dek = unwrap(kek, k.instance_id, &k.kek_id, &k.wrapped_dek)?;
            Ok((k.instance_id, dek))
        })
        .collect()
}

/// The data key of `instance_id`.
pub async fn load_one(
    kek: &SecretBox,
    db: &mut PgConnection,
    instance_id: Uuid,
) -> Result<SecretBox> {
    load(kek, db, &[instance_id])
        .await?
        .remove(&instance_id)
        .ok_or_else(|| Error::Internal(format!("instance {instance_id} has no data key")))
}

/// What a rotation touched.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rotated {
    pub data_keys: usize,
    pub gateway_tokens: usize,
    pub idempotent_answers: usize,
    /// Custom domain certificate keys and the ACME account.
    pub certificate_keys: usize,
    /// Secrets of mail not sent yet (links' tokens).
    pub mail_secrets: usize,
    /// Accounts' TOTP secrets.
    pub totp_secrets: usize,
}

/// Re-wraps every data key, and re-seals everything sealed directly, from
/// `old` to `new`, all or nothing. Data keys already under `new` are left
/// alone, so a rotation that was interrupted can simply be run again.
pub async fn rotate(db: &PgPool, old: &SecretBox, new: &SecretBox) -> Result<Rotated> {
    let mut tx = db.begin().await?;
    let mut done = Rotated::default();
    let keys: Vec<WrappedKey> =
        sqlx::query_as("SELECT instance_id, kek_id, wrapped_dek FROM tenant_keys FOR UPDATE")
            .fetch_all(&mut *tx)
            .await?;
    for WrappedKey {
        instance_id: id,
        kek_id,
        wrapped_dek: wrapped,
    } in keys
    {
        if kek_id == new.id() {
            continue;
        }
        if kek_id != old.id() {
            return Err(Error::Internal(format!(
                "the data key of instance {id} is wrapped by KEK {kek_id}, neither the old nor the new one"
            )));
        }
        let key = old.open(&dek_aad(id), &wrapped)?;
        sqlx::query("UPDATE tenant_keys SET kek_id = $2, wrapped_dek = $3 WHERE instance_id = $1")
            .bind(id)
            .bind(new.id())
            .bind(new.seal(&dek_aad(id), &key)?)
            .execute(&mut *tx)
            .await?;
        done.data_keys += 1;
    }
    let tokens: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, gateway_token_enc FROM containers FOR UPDATE")
            .fetch_all(&mut *tx)
            .await?;
    for (id, sealed) in tokens {
        let aad = aad::gateway_token(id);
        // Already under the new key (a rerun): leave it.
        let Ok(plain) = old.open(&aad, &sealed) else {
            new.open(&aad, &sealed)?;
            continue;
        };
        sqlx::query("UPDATE containers SET gateway_token_enc = $2 WHERE id = $1")
            .bind(id)
            .bind(new.seal(&aad, &plain)?)
            .execute(&mut *tx)
            .await?;
        done.gateway_tokens += 1;
    }
    done.idempotent_answers = reseal_answers(&mut tx, old, new).await?;
    done.certificate_keys = reseal_acme(&mut tx, old, new).await?;
    done.mail_secrets = reseal_outbox(&mut tx, old, new).await?;
    done.totp_secrets = reseal_totp(&mut tx, old, new).await?;
    tx.commit().await?;
    Ok(done)
}

/// Re-seals every stored idempotent answer from `old` to `new`, inside the
/// caller's transaction. Answers already under `new` are left alone.
async fn reseal_answers(tx: &mut PgConnection, old: &SecretBox, new: &SecretBox) -> Result<usize> {
    let rows: Vec<(Uuid, String, Vec<u8>)> = sqlx::query_as(
        "SELECT user_id, key, response_enc FROM idempotency_keys
          WHERE response_enc IS NOT NULL FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut n = 0;
    for (user_id, key, sealed) in rows {
        let a = aad::idempotent_answer(user_id, &key);
        let Ok(plain) = old.open(&a, &sealed) else {
            new.open(&a, &sealed)?;
            continue;
        };
        sqlx::query(
            "UPDATE idempotency_keys SET response_enc = $3 WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(&key)
        .bind(new.seal(&a, &plain)?)
        .execute(&mut *tx)
        .await?;
        n += 1;
    }
    Ok(n)
}

/// Re-seals the secrets of mail not sent yet from `old` to `new`, inside
/// the caller's transaction.
async fn reseal_outbox(tx: &mut PgConnection, old: &SecretBox, new: &SecretBox) -> Result<usize> {
    let rows: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
        "SELECT id, dedupe_key, secret_enc FROM outbox WHERE secret_enc IS NOT NULL FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut n = 0;
    for (id, key, sealed) in rows {
        let Some(resealed) = reseal(old, new, &aad::outbox_secret(&key), &sealed)? else {
            continue;
        };
        sqlx::query("UPDATE outbox SET secret_enc = $2 WHERE id = $1")
            .bind(id)
            .bind(resealed)
            .execute(&mut *tx)
            .await?;
        n += 1;
    }
    Ok(n)
}

/// Re-seals every account's TOTP secret (set up or in force) from `old`
/// to `new`, inside the caller's transaction.
async fn reseal_totp(tx: &mut PgConnection, old: &SecretBox, new: &SecretBox) -> Result<usize> {
    let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT id, totp_secret_enc FROM users WHERE totp_secret_enc IS NOT NULL FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut n = 0;
    for (id, sealed) in rows {
        let Some(resealed) = reseal(old, new, &aad::totp_secret(id), &sealed)? else {
            continue;
        };
        sqlx::query("UPDATE users SET totp_secret_enc = $2 WHERE id = $1")
            .bind(id)
            .bind(resealed)
            .execute(&mut *tx)
            .await?;
        n += 1;
    }
    Ok(n)
}

/// `sealed` under `new` instead of `old`; `None` when it is under `new`
/// already (a rerun), an error when it opens under neither.
fn reseal(old: &SecretBox, new: &SecretBox, aad: &str, sealed: &[u8]) -> Result<Option<Vec<u8>>> {
    match old.open(aad, sealed) {
        Ok(plain) => Ok(Some(new.seal(aad, &plain)?)),
        Err(_) => Ok(new.open(aad, sealed).map(|_| None)?),
    }
}

/// Re-seals custom domains' certificate keys and the ACME account's
/// credentials from `old` to `new`, inside the caller's transaction.
async fn reseal_acme(tx: &mut PgConnection, old: &SecretBox, new: &SecretBox) -> Result<usize> {
    let mut n = 0;
    let keys: Vec<(String, Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT hostname, instance_id, key_sealed FROM domains WHERE key_sealed IS NOT NULL FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (hostname, instance_id, sealed) in keys {
        let a = aad::domain_key(instance_id, &hostname);
        let Ok(plain) = old.open(&a, &sealed) else {
            new.open(&a, &sealed)?;
            continue;
        };
        sqlx::query("UPDATE domains SET key_sealed = $3 WHERE hostname = $1 AND instance_id = $2")
            .bind(&hostname)
            .bind(instance_id)
            .bind(new.seal(&a, &plain)?)
            .execute(&mut *tx)
            .await?;
        n += 1;
    }
    let accounts: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT directory_url, credentials_sealed FROM acme_accounts FOR UPDATE")
            .fetch_all(&mut *tx)
            .await?;
    for (url, sealed) in accounts {
        let a = aad::acme_account(&url);
        let Ok(plain) = old.open(&a, &sealed) else {
            new.open(&a, &sealed)?;
            continue;
        };
        sqlx::query("UPDATE acme_accounts SET credentials_sealed = $2 WHERE directory_url = $1")
            .bind(&url)
            .bind(new.seal(&a, &plain)?)
            .execute(&mut *tx)
            .await?;
        n += 1;
    }
    Ok(n)
}

/// Moves provider keys sealed directly under the KEK (before envelopes) into
/// per-instance envelopes. Idempotent; run at start-up.
pub async fn migrate_legacy(db: &PgPool, kek: &SecretBox) -> Result<usize> {
    let mut tx = db.begin().await?;
    let legacy: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT s.instance_id FROM secrets s
          WHERE NOT EXISTS (SELECT 1 FROM tenant_keys k WHERE k.instance_id = s.instance_id)",
    )
    .fetch_all(&mut *tx)
    .await?;
    for &instance_id in &legacy {
        let dek = create(kek, &mut tx, instance_id).await?;
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT name, ciphertext FROM secrets WHERE instance_id = $1")
                .bind(instance_id)
                .fetch_all(&mut *tx)
                .await?;
        for (name, sealed) in rows {
            let aad = aad::secret(instance_id, &name);
            let plain = kek.open(&aad, &sealed)?;
            sqlx::query("UPDATE secrets SET ciphertext = $3 WHERE instance_id = $1 AND name = $2")
                .bind(instance_id)
                .bind(&name)
                .bind(dek.seal(&aad, &plain)?)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(legacy.len())
}
