//! The credit ledger on a real PostgreSQL (`CLAWDEPLOY_TEST_PG`): holds
//! from two proxies at once never exceed the balance, usage flushed twice
//! counts once, and the leases of a proxy that died come back.

use std::sync::Arc;
use std::time::Duration;

use clawdeploy_llm_proxy::ledger::Ledger;
use clawdeploy_llm_proxy::money::Micros;
use clawdeploy_llm_proxy::usage::{PayMode, Recorder, UsageEvent};
use sqlx::PgPool;
use uuid::Uuid;

async fn database() -> PgPool {
    let admin_url = std::env::var("CLAWDEPLOY_TEST_PG")
        .expect("CLAWDEPLOY_TEST_PG is not set: run the suite with scripts/test");
    let name = format!("cd_ledger_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let db = PgPool::connect(&format!("{base}/{name}")).await.unwrap();
    clawdeploy_scheduler::db::migrate(&db).await.unwrap();
    db
}

async fn account(db: &PgPool, balance: i64) -> Uuid {
    let user = Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')")
        .bind(user)
        .bind(format!("{user}@example.com"))
        .execute(db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO credit_balances (user_id, balance_micros) VALUES ($1, $2)")
        .bind(user)
        .bind(balance)
        .execute(db)
        .await
        .unwrap();
    user
}

async fn scalar(db: &PgPool, sql: &str, user: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(user)
        .fetch_one(db)
        .await
        .unwrap()
}

async fn balance_of(db: &PgPool, user: Uuid) -> i64 {
    scalar(
        db,
        "SELECT balance_micros FROM credit_balances WHERE user_id = $1",
        user,
    )
    .await
}

async fn leases_of(db: &PgPool, user: Uuid) -> i64 {
    scalar(
        db,
        "SELECT count(*) FROM credit_leases WHERE user_id = $1",
        user,
    )
    .await
}

fn event(user: Uuid, lease: Uuid, charged: u64) -> UsageEvent {
    UsageEvent {
        id: Uuid::new_v4(),
        instance_id: Uuid::new_v4(),
        user_id: user,
        model: "openai/gpt-4o".into(),
        pay_mode: PayMode::Credits,
        input_tokens: 10,
        cached_input_tokens: 0,
        output_tokens: 5,
        charged: Micros(charged),
        estimated: false,
        lease_id: Some(lease),
        at: chrono::Utc::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_from_two_proxies_at_once_never_exceed_the_balance() {
    let db = database().await;
    let user = account(&db, 1_000_000).await;
    let proxies: Vec<Arc<Ledger>> = (0..2)
        .map(|i| {
            Arc::new(Ledger::new(
                db.clone(),
                format!("p{i}"),
                Duration::from_secs(30),
                Micros(100_000),
            ))
        })
        .collect();
    // 400 requests each wanting 30,000 µ$ (at least 10,000): about 33 fit.
    let tasks: Vec<_> = (0..400)
        .map(|n| {
            let l = proxies[n % 2].clone();
            tokio::spawn(async move { (n % 2, l.hold(user, Micros(30_000), Micros(10_000)).await) })
        })
        .collect();
    let mut held = 0u64;
    let mut granted = Vec::new();
    for t in tasks {
        if let (p, Ok(h)) = t.await.unwrap() {
            held += h.amount.0;
            granted.push((p, h));
        }
    }
    assert!(held <= 1_000_000, "held {held} of 1,000,000");
    assert!(granted.len() >= 30, "{} granted", granted.len());
    let balance = balance_of(&db, user).await;
    let leased = scalar(
        &db,
        "SELECT COALESCE(sum(amount_micros), 0)::bigint FROM credit_leases WHERE user_id = $1",
        user,
    )
    .await;
    assert_eq!(balance + leased, 1_000_000, "money moved, none made");
    assert!(balance >= 0);

    // Each settles for a third of its hold, recorded and flushed (twice:
    // the second flush finds nothing new); then every lease goes back.
    let recorders: Vec<Recorder> = (0..2).map(|_| Recorder::new(db.clone())).collect();
    let mut charged = 0u64;
    for (p, h) in &granted {
        let c = Micros(h.amount.0 / 3);
        let ev = event(user, h.lease_id, c.0);
        recorders[*p].record(ev.clone());
        recorders[*p].record(ev);
        charged += proxies[*p].settle(h, c).await.0;
    }
    for (r, l) in recorders.iter().zip(&proxies) {
        r.flush(l, Vec::new()).await.unwrap();
        let retired = l.retire_idle(Duration::ZERO).await;
        r.flush(l, retired).await.unwrap();
    }
    let events = scalar(
        &db,
        "SELECT count(*) FROM llm_usage_events WHERE user_id = $1",
        user,
    )
    .await;
    assert_eq!(
        events as usize,
        granted.len(),
        "each event once, though recorded twice"
    );
    let leases = leases_of(&db, user).await;
    assert_eq!(leases, 0);
    let balance = balance_of(&db, user).await;
    assert_eq!(
        balance,
        1_000_000 - charged as i64,
        "spent exactly what was charged"
    );
}

#[tokio::test]
async fn a_dead_proxys_lease_comes_back_when_it_expires() {
    let db = database().await;
    let user = account(&db, 500_000).await;
    let dead = Ledger::new(
        db.clone(),
        "dead".into(),
        Duration::from_secs(1),
        Micros(1_000_000),
    );
    let h = dead.hold(user, Micros(100_000), Micros(1)).await.unwrap();
    // It charged 40,000 and flushed that, then died with the hold open.
    let r = Recorder::new(db.clone());
    r.record(event(user, h.lease_id, 40_000));
    r.flush(&dead, Vec::new()).await.unwrap();
    drop(dead);
    let balance = balance_of(&db, user).await;
    assert!(balance < 500_000, "the lease holds part of it");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Any other proxy's flush recovers it.
    let alive = Ledger::new(
        db.clone(),
        "alive".into(),
        Duration::from_secs(30),
        Micros(1_000_000),
    );
    Recorder::new(db.clone())
        .flush(&alive, Vec::new())
        .await
        .unwrap();
    let leases = leases_of(&db, user).await;
    assert_eq!(leases, 0);
    let balance = balance_of(&db, user).await;
    assert_eq!(balance, 460_000, "all but the flushed charge came back");
}

#[tokio::test]
async fn an_empty_balance_is_refused_with_what_there_is() {
    let db = database().await;
    let user = account(&db, 5_000).await;
    let l = Ledger::new(
        db.clone(),
        "p".into(),
        Duration::from_secs(30),
        Micros(1_000_000),
    );
    // Less than wanted but more than the least: a partial hold.
    let h = l.hold(user, Micros(8_000), Micros(1_000)).await.unwrap();
    assert!(h.partial);
    assert_eq!(h.amount, Micros(5_000));
    match l.hold(user, Micros(8_000), Micros(1_000)).await {
        Err(clawdeploy_llm_proxy::error::ProxyError::InsufficientCredits { balance }) => {
            assert_eq!(balance, Micros(0))
        }
        other => panic!("{other:?}"),
    }
    l.settle(&h, Micros(0)).await;
    assert!(
        l.hold(user, Micros(8_000), Micros(1_000)).await.is_ok(),
        "a released hold frees it"
    );
}
