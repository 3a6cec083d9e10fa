//! `Idempotency-Key` on signups: replays, reuse, and a claim whose answer
//! was never stored.

use clawdeploy_scheduler::app::claims::IdempotencyKey;
use clawdeploy_scheduler::error::Error;
use clawdeploy_scheduler::lifecycle::claim;
use clawdeploy_scheduler::lifecycle::idempotency::{self, Begin};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_refuses_reuse() {
    let app = app().await;
    let u = user(&app, "idem@example.com").await;
    let hash = idempotency::fingerprint(&json!({"subdomain": "x"}));
    assert!(matches!(
        idempotency::begin(&app, u, "k1", &hash).await.unwrap(),
        Begin::First
    ));
    // The first is still running.
    let r = idempotency::begin(&app, u, "k1", &hash).await;
    assert!(matches!(
        r,
        Err(Error::Conflict {
            code: "idempotency_in_progress",
            ..
        })
    ));
    idempotency::finish(&app, u, "k1", 201, br#"{"instance":{"id":"i"}}"#).await;
    match idempotency::begin(&app, u, "k1", &hash).await.unwrap() {
        Begin::Replay(status, body) => {
            assert_eq!(status, 201);
            assert_eq!(body, br#"{"instance":{"id":"i"}}"#);
        }
        _ => panic!("a finished key replays"),
    }
    // Stored sealed.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT response_enc FROM idempotency_keys WHERE key = 'k1'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains("instance"));
    let other = idempotency::fingerprint(&json!({"subdomain": "y"}));
    let r = idempotency::begin(&app, u, "k1", &other).await;
    assert!(matches!(
        r,
        Err(Error::Unprocessable {
            code: "idempotency_key_reused",
            ..
        })
    ));
    // A server error is not kept: the retry runs again.
    assert!(matches!(
        idempotency::begin(&app, u, "k2", &hash).await.unwrap(),
        Begin::First
    ));
    idempotency::finish(&app, u, "k2", 503, b"{}").await;
    assert!(matches!(
        idempotency::begin(&app, u, "k2", &hash).await.unwrap(),
        Begin::First
    ));
}

/// A signup whose claim committed but whose answer was never stored (the
/// database went away after the commit) is answered with its instance on
/// retry, never claimed twice; a server error does not release such a key.
#[tokio::test]
async fn a_key_whose_claim_committed_answers_with_its_instance() {
    let app = app().await;
    node(&app, "n1").await;
    idle(&app, "n1", 1).await;
    let u = user(&app, "lost-answer@example.com").await;
    let hash = idempotency::fingerprint(&json!({"subdomain": "lost"}));
    assert!(matches!(
        idempotency::begin(&app, u, "k", &hash).await.unwrap(),
        Begin::First
    ));
    let mut req = request(u, "lost");
    req.idempotency = Some(IdempotencyKey {
        key: "k".into(),
        request_hash: hash.clone(),
    });
    let claimed = claim::claim(&app, req).await.unwrap();
    // While the first request may still answer, a repeat is told to wait.
    assert!(matches!(
        idempotency::begin(&app, u, "k", &hash).await,
        Err(Error::Conflict {
            code: "idempotency_in_progress",
            ..
        })
    ));
    // Its answer never came (the process died): past the takeover time the
    // retry learns the instance, and no second claim runs.
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '10 minutes'")
        .execute(&app.db)
        .await
        .unwrap();
    match idempotency::begin(&app, u, "k", &hash).await.unwrap() {
        Begin::Claimed(id) => assert_eq!(id, claimed.instance_id),
        _ => panic!("a key with a committed claim answers with its instance"),
    }
    idempotency::finish(&app, u, "k", 503, b"{}").await;
    assert!(matches!(
        idempotency::begin(&app, u, "k", &hash).await.unwrap(),
        Begin::Claimed(_)
    ));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM instances WHERE subdomain = 'lost'"
        )
        .await,
        1
    );
    assert!(claimed.gateway_token.is_some(), "the claim knows its token");
}
