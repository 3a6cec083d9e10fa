//! What every database-level test shares: a fresh migrated database with an
//! `App` over it, nodes, pool containers, users and signups, the router on
//! loopback.

use std::collections::BTreeMap;

use clawdeploy_scheduler::app::claims::SignUp;
use clawdeploy_scheduler::app::{App, AppRef, Config};
use clawdeploy_scheduler::crypto::pki::Ca;
use clawdeploy_scheduler::crypto::SecretBox;
use clawdeploy_scheduler::fleet::{capacity, settings};
use sqlx::PgPool;
use uuid::Uuid;

/// A fresh, migrated database and an `App` over it.
pub async fn app() -> AppRef {
    app_with(Config::default()).await
}

pub async fn app_with(cfg: Config) -> AppRef {
    let admin_url = std::env::var("CLAWDEPLOY_TEST_PG")
        .expect("CLAWDEPLOY_TEST_PG is not set: run the suite with scripts/test");
    let name = format!("cd_db_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let db = PgPool::connect(&format!("{base}/{name}")).await.unwrap();
    clawdeploy_scheduler::db::migrate(&db).await.unwrap();
    let dir = std::env::temp_dir().join(&name);
    let ca = Ca::load_or_create(&dir).unwrap();
    let kek = SecretBox::from_hex(&SecretBox::generate_key_hex()).unwrap();
    let app = App::new(cfg, db, kek, ca, Some("admin-token"), None);
    settings::seed(&app).await.unwrap();
    app
}

/// An active node that heartbeats, with room for 20 containers.
pub async fn node(app: &App, id: &str) {
    sqlx::query(
        "INSERT INTO nodes (id, name, state, last_heartbeat, max_containers, memory_bytes, memory_available_bytes, private_address)
         VALUES ($1, $1, 'active', now(), 20, 8589934592, 8589934592, '10.1.2.3')",
    )
    .bind(id)
    .execute(&app.db)
    .await
    .unwrap();
}

/// `n` warm idle pool containers on `node_id`.
pub async fn idle(app: &App, node_id: &str, n: usize) -> Vec<Uuid> {
    let s = settings::load(&app.db).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..n {
        let mut tx = app.db.begin().await.unwrap();
        let t = capacity::insert_container(app, &mut tx, &s, node_id)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        sqlx::query(
            "UPDATE containers SET state = 'idle', upstream = '10.0.0.9:18789', warm_at = now() WHERE id = $1",
        )
        .bind(t.id)
        .execute(&app.db)
        .await
        .unwrap();
        ids.push(t.id);
    }
    ids
}

/// An account with a proven address (no session).
pub async fn user(app: &App, email: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, email_verified_at) VALUES ($1, $2, 'x', now())",
    )
        .bind(id)
        .bind(email)
        .execute(&app.db)
        .await
        .unwrap();
    id
}

/// A ready instance of a new user's at `subdomain`, on `container`.
pub async fn instance(app: &App, subdomain: &str, container: Option<Uuid>) -> Uuid {
    let u = user(app, &format!("{subdomain}@example.com")).await;
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO instances (id, user_id, subdomain, status, container_id) VALUES ($1, $2, $3, 'ready', $4)",
    )
    .bind(id)
    .bind(u)
    .bind(subdomain)
    .bind(container)
    .execute(&app.db)
    .await
    .unwrap();
    id
}

pub fn request(user_id: Uuid, subdomain: &str) -> SignUp {
    SignUp {
        user_id,
        subdomain: subdomain.into(),
        api_keys: BTreeMap::from([("openai".to_owned(), format!("sk-{subdomain}-1234567"))]),
        idempotency: None,
    }
}

/// An account made through the product's registration, from no known
/// address (no per-address limit), its address then proven as its link
/// would prove it (verification has tests of its own).
pub async fn register(
    app: &App,
    email: &str,
    name: &str,
) -> clawdeploy_scheduler::accounts::Session {
    let session = clawdeploy_scheduler::accounts::register(
        app,
        clawdeploy_scheduler::accounts::Registration {
            email,
            password: "correct-horse-battery".into(),
            name,
            client: Default::default(),
            per_address_per_hour: 0,
        },
    )
    .await
    .unwrap();
    sqlx::query("UPDATE users SET email_verified_at = now() WHERE id = $1")
        .bind(session.user_id)
        .execute(&app.db)
        .await
        .unwrap();
    session
}

/// A login with the password alone (no address), for an account without
/// MFA: its session.
pub async fn login(
    app: &App,
    email: &str,
    password: &str,
) -> clawdeploy_scheduler::error::Result<clawdeploy_scheduler::accounts::Session> {
    use clawdeploy_scheduler::accounts::{self, LoginOutcome};
    match accounts::login(&app.db, email, password.into(), &Default::default()).await? {
        LoginOutcome::Session(s) => Ok(s),
        LoginOutcome::MfaRequired { .. } => panic!("{email} has MFA on"),
    }
}

pub async fn count(app: &App, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.db).await.unwrap()
}

/// Serves the router on a loopback port; returns its base URL.
pub async fn serve(app: AppRef) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = clawdeploy_scheduler::api::router(app, clawdeploy_scheduler::metrics_handle());
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap();
    });
    format!("http://{addr}")
}

/// The router on loopback as a client sees it, with a user agent of its
/// own.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn serve(app: AppRef, user_agent: &str) -> Api {
        Api {
            base: serve(app).await,
            http: reqwest::Client::builder()
                .user_agent(user_agent)
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    /// Registers `email` (password "correct-horse-battery") through the
    /// API; its session token.
    pub async fn register(&self, email: &str) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/auth/register",
                None,
                Some(serde_json::json!({"email": email, "password": "correct-horse-battery"})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// `method path` with `token` (if any) and a JSON `body` (if any):
    /// the status and the JSON answer (null when there is none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }
}

/// The version of the instance's own live route, if it has one.
pub async fn live_route_version(app: &App, instance: uuid::Uuid) -> Option<u64> {
    sqlx::query_scalar::<_, i64>(
        "SELECT version FROM routes WHERE instance_id = $1 AND NOT custom AND removed_at IS NULL",
    )
    .bind(instance)
    .fetch_optional(&app.db)
    .await
    .unwrap()
    .map(|v| v as u64)
}
