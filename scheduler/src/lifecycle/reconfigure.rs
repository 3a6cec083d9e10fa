//! New provider keys (or a new default model) for
//! a live gateway. The keys are sealed and stored, the config version moves
//! on, the node gets its desired state, and the agent rewrites
//! `openclaw.json` in place (the gateway hot-reloads it; no restart). The
//! answer waits, bounded, until the agent reports the new version live.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::instances::{self, default_model_for, validate_keys, validate_provider, Instance};
use crate::agents::desired;
use crate::app::{App, AppRef};
use crate::audit::audit;
use crate::crypto::{aad, envelope};
use crate::error::{Error, Result};
use crate::model::InstanceStatus;

/// A change to a live instance's config.
#[derive(Debug, Default)]
pub struct Change {
    /// Provider → new key; `None` removes the provider's key.
    pub api_keys: BTreeMap<String, Option<String>>,
    pub default_model: Option<String>,
}

/// The instance after a change: its new config version, and whether the
/// gateway confirmed running it within the wait.
#[derive(Debug)]
pub struct Reconfigured {
    pub instance: Instance,
    pub config_version: i64,
    pub applied: bool,
}

fn validate_model(m: &str) -> Result<String> {
    let m = m.trim();
    if m.is_empty() || m.len() > 200 || !m.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Invalid {
            field: "defaultModel",
            message: "must be 1 to 200 printable characters, like openai/gpt-4o".into(),
        });
    }
    Ok(m.to_owned())
}

/// Stores the change (keys sealed), moves the config version on, pushes
/// the node its desired state and waits, bounded, for the agent to report
/// the new version live.
pub async fn reconfigure(app: &AppRef, user_id: Uuid, change: Change) -> Result<Reconfigured> {
    let (sets, removals): (BTreeMap<_, _>, Vec<_>) = {
        let mut sets = BTreeMap::new();
        let mut removals = Vec::new();
        for (provider, key) in change.api_keys {
            match key {
                Some(k) => {
                    sets.insert(provider, k);
                }
                None => removals.push(validate_provider(&provider)?),
            }
        }
        (validate_keys(sets)?, removals)
    };
    let model = change
        .default_model
        .as_deref()
        .map(validate_model)
        .transpose()?;
    if sets.is_empty() && removals.is_empty() && model.is_none() {
        return Err(Error::BadRequest(
            "nothing to change: give apiKeys and/or defaultModel".into(),
        ));
    }

    let mut tx = app.db.begin().await?;
    let instances::Locked {
        id: instance_id,
        default_model: current_model,
        node_id,
        ..
    } = instances::lock_newest(
        &mut tx,
        user_id,
        &[InstanceStatus::Pending, InstanceStatus::Ready],
    )
    .await?;
    let dek = envelope::load_one(&app.secrets, &mut tx, instance_id).await?;
    for (name, value) in &sets {
        let sealed = dek.seal(&aad::secret(instance_id, name), value.as_bytes())?;
        sqlx::query(
            "INSERT INTO secrets (instance_id, name, ciphertext) VALUES ($1, $2, $3)
             ON CONFLICT (instance_id, name) DO UPDATE SET ciphertext = EXCLUDED.ciphertext, created_at = now()",
        )
        .bind(instance_id)
        .bind(name)
        .bind(sealed)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM secrets WHERE instance_id = $1 AND name = ANY($2)")
        .bind(instance_id)
        .bind(&removals)
        .execute(&mut *tx)
        .await?;
    let providers: Vec<String> =
        sqlx::query_scalar("SELECT name FROM secrets WHERE instance_id = $1 ORDER BY name")
            .bind(instance_id)
            .fetch_all(&mut *tx)
            .await?;
    // An explicit model wins; otherwise keep the current one while its
    // provider still has a key, else follow the remaining keys.
    let provider_of = |m: &str| m.split('/').next().unwrap_or_default().to_owned();
    let model = match model {
        Some(m) => m,
        None if providers.contains(&provider_of(&current_model)) => current_model,
        None => default_model_for(
            &providers
                .iter()
                .map(|p| (p.clone(), String::new()))
                .collect(),
        ),
    };
    let version: i64 = sqlx::query_scalar(
        "UPDATE instances SET config_version = config_version + 1, default_model = $2
          WHERE id = $1 RETURNING config_version",
    )
    .bind(instance_id)
    .bind(&model)
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut *tx,
        &format!("user:{user_id}"),
        "instance.reconfigured",
        &instance_id.to_string(),
        // Which providers changed, never the keys.
        serde_json::json!({"set": sets.keys().collect::<Vec<_>>(), "removed": removals, "configVersion": version}),
    )
    .await;
    tx.commit().await?;

    if let Some(node) = &node_id {
        desired::bump_and_push(app, node).await?;
    }
    let applied = wait_applied(app, instance_id, version).await?;
    Ok(Reconfigured {
        instance: instances::by_id(app, instance_id).await?,
        config_version: version,
        applied,
    })
}

/// Waits (at most the claim wait) until the instance's container reports
/// `version` live.
async fn wait_applied(app: &App, instance_id: Uuid, version: i64) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + app.cfg.claim_wait;
    loop {
        let applied: Option<i64> = sqlx::query_scalar(
            "SELECT c.applied_config FROM instances i JOIN containers c ON c.id = i.container_id
              WHERE i.id = $1",
        )
        .bind(instance_id)
        .fetch_optional(&app.db)
        .await?;
        if applied.is_some_and(|a| a >= version) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
