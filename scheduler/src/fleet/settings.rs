//! The pool's settings (image, generation, idle bounds), kept in one
//! database row so every scheduler uses the same. The first scheduler seeds
//! them from its flags; operators change them with `PUT /admin/pool`, and a
//! new image or generation rolls the pool.

use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::audit::audit;
use crate::error::{Error, Result};

/// Idle bounds above this are refused (a typo, not a plan).
const MAX_IDLE_LIMIT: i32 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolSettings {
    pub image: String,
    pub generation: i32,
    pub min_idle: i32,
    pub max_idle: i32,
}

/// How many warm containers of one image and generation are in one state.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct WarmCount {
    pub state: crate::model::ContainerState,
    pub image: String,
    pub generation: i32,
    pub count: i64,
}

/// The pool's containers (creating, warming, idle) by state, image and
/// generation.
pub async fn warm_counts(app: &App) -> Result<Vec<WarmCount>> {
    Ok(sqlx::query_as(
        "SELECT state, image, pool_generation AS generation, count(*) FROM containers
          WHERE state IN ('creating', 'warming', 'idle') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(&app.db)
    .await?)
}

/// A change requested by an operator; absent fields stay as they are.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolChange {
    pub image: Option<String>,
    pub generation: Option<i32>,
    pub min_idle: Option<i32>,
    pub max_idle: Option<i32>,
}

/// Writes the flags' settings unless some scheduler already did.
pub async fn seed(app: &App) -> Result<PoolSettings> {
    let c = &app.cfg;
    sqlx::query(
        "INSERT INTO pool_settings (id, image, generation, min_idle, max_idle)
         VALUES (true, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&c.image)
    .bind(c.pool_generation.max(1))
    .bind(c.min_idle.min(c.max_idle) as i32)
    .bind(c.max_idle as i32)
    .execute(&app.db)
    .await?;
    let current = load(&app.db).await?;
    if current.image != c.image || current.generation != c.pool_generation {
        tracing::info!(
            image = current.image,
            generation = current.generation,
            "pool settings come from the database (PUT /admin/pool changes them), not from this scheduler's flags"
        );
    }
    Ok(current)
}

pub async fn load<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<PoolSettings> {
    Ok(
        sqlx::query_as("SELECT image, generation, min_idle, max_idle FROM pool_settings WHERE id")
            .fetch_one(db)
            .await?,
    )
}

fn invalid(field: &'static str, message: &str) -> Error {
    Error::Invalid {
        field,
        message: message.into(),
    }
}

/// Applies `change` to `current`. A new image without a generation bumps
/// the generation; a given generation must move forward.
pub fn apply(current: &PoolSettings, change: PoolChange) -> Result<PoolSettings> {
    let mut next = current.clone();
    if let Some(image) = change.image {
        let image = image.trim().to_owned();
        if image.is_empty() || image.len() > 255 || !image.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("image", "must be 1 to 255 printable characters"));
        }
        if image != current.image && change.generation.is_none() {
            next.generation = current.generation.saturating_add(1);
        }
        next.image = image;
    }
    if let Some(g) = change.generation {
        if g < current.generation {
            return Err(invalid(
                "generation",
                &format!("must not go back (current {})", current.generation),
            ));
        }
        next.generation = g;
    }
    if let Some(m) = change.min_idle {
        next.min_idle = m;
    }
    if let Some(m) = change.max_idle {
        next.max_idle = m;
    }
    if next.min_idle < 0 || next.max_idle > MAX_IDLE_LIMIT {
        return Err(invalid(
            "minIdle",
            &format!("idle bounds must be within 0..={MAX_IDLE_LIMIT}"),
        ));
    }
    if next.min_idle > next.max_idle {
        return Err(invalid("minIdle", "must not exceed maxIdle"));
    }
    Ok(next)
}

/// Stores `next` (whole row, under a row lock so concurrent changes apply
/// one after the other) and records it in the audit log.
pub async fn update(app: &App, actor: &str, change: PoolChange) -> Result<PoolSettings> {
    let mut tx = app.db.begin().await?;
    let current: PoolSettings = sqlx::query_as(
        "SELECT image, generation, min_idle, max_idle FROM pool_settings WHERE id FOR UPDATE",
    )
    .fetch_one(&mut *tx)
    .await?;
    let next = apply(&current, change)?;
    sqlx::query(
        "UPDATE pool_settings SET image = $1, generation = $2, min_idle = $3, max_idle = $4, updated_at = now() WHERE id",
    )
    .bind(&next.image)
    .bind(next.generation)
    .bind(next.min_idle)
    .bind(next.max_idle)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut *tx,
        actor,
        "pool.settings",
        "pool",
        serde_json::json!({"from": current, "to": next}),
    )
    .await;
    tx.commit().await?;
    if next.generation != current.generation {
        tracing::info!(
            image = next.image,
            generation = next.generation,
            "pool generation changed: rolling the pool"
        );
    }
    app.tasks.pool_manager.activate();
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> PoolSettings {
        PoolSettings {
            image: "openclaw:1".into(),
            generation: 3,
            min_idle: 5,
            max_idle: 20,
        }
    }

    #[test]
    fn a_new_image_bumps_the_generation() {
        let next = apply(
            &current(),
            PoolChange {
                image: Some("openclaw:2".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((next.image.as_str(), next.generation), ("openclaw:2", 4));
        let same = apply(
            &current(),
            PoolChange {
                image: Some("openclaw:1".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(same, current());
    }

    #[test]
    fn bad_changes_are_refused() {
        for change in [
            PoolChange {
                generation: Some(2),
                ..Default::default()
            },
            PoolChange {
                min_idle: Some(21),
                ..Default::default()
            },
            PoolChange {
                min_idle: Some(-1),
                ..Default::default()
            },
            PoolChange {
                max_idle: Some(MAX_IDLE_LIMIT + 1),
                ..Default::default()
            },
            PoolChange {
                image: Some(" ".into()),
                ..Default::default()
            },
            PoolChange {
                image: Some("has space".into()),
                ..Default::default()
            },
        ] {
            assert!(apply(&current(), change).is_err());
        }
    }
}
