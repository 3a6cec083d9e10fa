//! A customer's instance: the rules for its subdomain and provider keys,
//! and how its owner sees it (the live gateway token, the keys masked).

use std::collections::BTreeMap;

use sqlx::PgPool;
use uuid::Uuid;

use crate::app::App;
use crate::crypto::{aad, envelope};
use crate::error::{Error, Result};
use crate::model::{InstanceStatus, Tier};

/// Names that never become customer subdomains.
const RESERVED: &[&str] = &[
    "www",
    "api",
    "admin",
    "app",
    "mail",
    "smtp",
    "imap",
    "pop",
    "ftp",
    "ns",
    "ns1",
    "ns2",
    "dns",
    "edge",
    "status",
    "docs",
    "help",
    "support",
    "billing",
    "dashboard",
    "console",
    "static",
    "cdn",
    "assets",
    "auth",
    "login",
    "signup",
    "scheduler",
    "grpc",
    "metrics",
    "root",
    "localhost",
];

/// Providers whose keys we inject into `openclaw.json`.
const PROVIDERS: &[&str] = &[
    "openai",
    "anthropic",
    "google",
    "openrouter",
    "mistral",
    "groq",
    "xai",
    "deepseek",
];

pub fn validate_subdomain(raw: &str) -> Result<String> {
    let s = raw.trim().to_ascii_lowercase();
    let invalid = |m: &str| {
        Err(Error::Invalid {
            field: "subdomain",
            message: m.into(),
        })
    };
    if !(3..=63).contains(&s.len()) {
        return invalid("must be 3 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("may contain only letters, digits and hyphens");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return invalid("must not start or end with a hyphen");
    }
    if s.get(2..4) == Some("--") {
        return invalid("must not have hyphens in the third and fourth positions");
    }
    if RESERVED.contains(&s.as_str()) {
        return invalid("is reserved");
    }
    Ok(s)
}

/// A provider we know how to configure, normalised.
pub fn validate_provider(provider: &str) -> Result<String> {
    let provider = provider.trim().to_ascii_lowercase();
    if !PROVIDERS.contains(&provider.as_str()) {
        return Err(Error::Invalid {
            field: "apiKeys",
            message: format!("unknown provider (known: {})", PROVIDERS.join(", ")),
        });
    }
    Ok(provider)
}

pub fn validate_keys(keys: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    keys.into_iter()
        .map(|(provider, key)| {
            let provider = validate_provider(&provider)?;
            let key = key.trim().to_owned();
            if key.is_empty() || key.len() > 512 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::Invalid {
                    field: "apiKeys",
                    message: format!("the {provider} key must be 1 to 512 printable characters"),
                });
            }
            Ok((provider, key))
        })
        .collect()
}

/// What a response shows of a key: enough to recognise it, not to use it.
pub fn mask(key: &str) -> String {
    let n = key.chars().count();
    if n < 12 {
        return "…".into();
    }
    let head: String = key.chars().take(3).collect();
    let tail: String = key.chars().skip(n - 4).collect();
    format!("{head}…{tail}")
}

pub fn default_model_for(keys: &BTreeMap<String, String>) -> String {
    match keys.keys().next().map(String::as_str) {
        Some("openai") => "openai/gpt-4o".into(),
        Some("anthropic") => "anthropic/claude-sonnet-4".into(),
        Some(other) => format!("{other}/default"),
        None => String::new(),
    }
}

/// An instance as its owner may see it.
#[derive(Debug)]
pub struct Instance {
    pub id: Uuid,
    pub subdomain: String,
    pub status: InstanceStatus,
    pub tier: Tier,
    /// The token of the instance's current container.
    pub gateway_token: Option<String>,
    /// Provider → masked key, when asked for.
    pub masked_keys: Option<BTreeMap<String, String>>,
}

#[derive(sqlx::FromRow)]
struct InstanceRow {
    id: Uuid,
    subdomain: String,
    status: InstanceStatus,
    tier: Tier,
}

const INSTANCE_COLUMNS: &str = "id, subdomain, status, tier";

/// The gateway token of the instance's current container.
pub async fn gateway_token(app: &App, instance_id: Uuid) -> Result<Option<String>> {
    let row: Option<(Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT c.id, c.gateway_token_enc FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(instance_id)
    .fetch_optional(&app.db)
    .await?;
    Ok(row
        .map(|(c, t)| app.secrets.open_string(&aad::gateway_token(c), &t))
        .transpose()?)
}

/// The instance with its token and its provider keys masked.
async fn with_keys(app: &App, row: InstanceRow) -> Result<Instance> {
    let id = row.id;
    let gateway_token = gateway_token(app, id).await?;
    let sealed: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, ciphertext FROM secrets WHERE instance_id = $1 ORDER BY name")
            .bind(id)
            .fetch_all(&app.db)
            .await?;
    let mut keys = BTreeMap::new();
    if !sealed.is_empty() {
        let mut conn = app.db.acquire().await?;
        let dek = envelope::load_one(&app.secrets, &mut conn, id).await?;
        for (name, ciphertext) in sealed {
            let key = dek.open_string(&aad::secret(id, &name), &ciphertext)?;
            keys.insert(name, mask(&key));
        }
    }
    Ok(Instance {
        id,
        subdomain: row.subdomain,
        status: row.status,
        tier: row.tier,
        gateway_token,
        masked_keys: Some(keys),
    })
}

/// The instance `id`, with its keys masked.
pub async fn by_id(app: &App, id: Uuid) -> Result<Instance> {
    let row: InstanceRow = sqlx::query_as(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1"
    ))
    .bind(id)
    .fetch_one(&app.db)
    .await?;
    with_keys(app, row).await
}

/// The user's live instance (the newest, when an earlier one failed).
pub async fn current_of(app: &App, user_id: Uuid) -> Result<Instance> {
    let row: Option<InstanceRow> = sqlx::query_as(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances
          WHERE user_id = $1 AND status <> 'deleted' ORDER BY created_at DESC LIMIT 1"
    ))
    .bind(user_id)
    .fetch_optional(&app.db)
    .await?;
    with_keys(app, row.ok_or(Error::NotFound("instance"))?).await
}

/// One of the user's instances; another user's is as unknown as a missing
/// one.
pub async fn owned_by(app: &App, user_id: Uuid, id: Uuid) -> Result<Instance> {
    let row: Option<InstanceRow> = sqlx::query_as(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1 AND user_id = $2"
    ))
    .bind(id)
    .bind(user_id)
    .fetch_optional(&app.db)
    .await?;
    with_keys(app, row.ok_or(Error::NotFound("instance"))?).await
}

/// Whether `subdomain` (already validated) could be taken now by a new
/// customer: no live instance has it and it is not cooling down.
pub async fn subdomain_available(app: &App, subdomain: &str) -> Result<bool> {
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM instances
                         WHERE subdomain = $1 AND status NOT IN ('deleted', 'failed'))",
    )
    .bind(subdomain)
    .fetch_one(&app.db)
    .await?;
    Ok(
        !taken
            && !cooling_down(&app.db, app.cfg.subdomain_cooldown, subdomain, Uuid::nil()).await?,
    )
}

/// The cool-down rule as SQL: an instance of another account released
/// under this subdomain within the cool-down. The arguments: the subdomain,
/// the claiming account and the cool-down in seconds, as SQL expressions.
/// One text for `cooling_down` and the warm batches (`warm.rs`).
macro_rules! cooling_instance {
    ($subdomain:literal, $user:literal, $secs:literal) => {
        concat!(
            "SELECT 1 FROM instances d WHERE d.subdomain = ",
            $subdomain,
            " AND d.user_id <> ",
            $user,
            " AND d.status = 'deleted' AND d.released_at > now() - make_interval(secs => ",
            $secs,
            ")"
        )
    };
}
pub(crate) use cooling_instance;

/// Whether `subdomain` was released to the cool-down recently (by someone
/// other than `user_id`, who may take their own name back).
pub async fn cooling_down(
    db: &PgPool,
    cooldown: std::time::Duration,
    subdomain: &str,
    user_id: Uuid,
) -> Result<bool> {
    let hit: Option<i32> =
        sqlx::query_scalar(concat!(cooling_instance!("$1", "$2", "$3"), " LIMIT 1"))
            .bind(subdomain)
            .bind(user_id)
            .bind(cooldown.as_secs_f64())
            .fetch_optional(db)
            .await?;
    Ok(hit.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_masked_to_a_recognisable_stub() {
        assert_eq!(mask("sk-proj-abcdefghijkl1234"), "sk-…1234");
        assert_eq!(mask("short"), "…");
        assert!(!mask("sk-ant-0123456789abcdef").contains("0123456789"));
    }

    #[test]
    fn subdomains_are_dns_labels_and_not_reserved() {
        assert_eq!(validate_subdomain("Alice-1").unwrap(), "alice-1");
        for bad in [
            "ab",
            "-abc",
            "abc-",
            "a_b",
            "a.b",
            "www",
            "admin",
            "mail",
            "api",
            "xn--abc",
            &"a".repeat(64),
            "héllo",
        ] {
            assert!(validate_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_checked() {
        let ok = validate_keys(BTreeMap::from([("OpenAI".into(), " sk-1 ".into())])).unwrap();
        assert_eq!(ok.get("openai").map(String::as_str), Some("sk-1"));
        assert!(validate_keys(BTreeMap::from([("evil".into(), "x".into())])).is_err());
        assert!(validate_keys(BTreeMap::from([("openai".into(), "has space".into())])).is_err());
    }
}

/// The caller's newest instance in one of `statuses`, as a change to it
/// needs it, locked in the caller's transaction.
#[derive(sqlx::FromRow)]
pub struct Locked {
    pub id: Uuid,
    pub subdomain: String,
    pub default_model: String,
    pub container_id: Option<Uuid>,
    /// Its container's node, when it has one.
    pub node_id: Option<String>,
}

/// Locks the caller's newest instance in one of `statuses` (`NotFound`
/// when there is none), so that two changes to it take turns.
pub async fn lock_newest(
    tx: &mut sqlx::PgConnection,
    user_id: Uuid,
    statuses: &[InstanceStatus],
) -> Result<Locked> {
    sqlx::query_as(
        "SELECT i.id, i.subdomain, i.default_model, i.container_id, c.node_id
           FROM instances i LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.user_id = $1 AND i.status = ANY($2)
          ORDER BY i.created_at DESC LIMIT 1
          FOR UPDATE OF i",
    )
    .bind(user_id)
    .bind(statuses)
    .fetch_optional(tx)
    .await?
    .ok_or(Error::NotFound("instance"))
}
