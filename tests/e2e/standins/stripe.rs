//! A local stand-in for Stripe, for the tests and `scripts/run-local`: it
//! answers the calls the scheduler's client makes (customers, Checkout
//! Sessions, billing portal sessions) with Stripe's own sample objects
//! (`tests/fixtures/stripe/`), checks the form parameters it receives, and
//! serves a "checkout page" that, when paid, sends the webhooks Stripe would
//! (`checkout.session.completed`, `customer.subscription.created`) signed
//! exactly as Stripe signs them, then redirects to the success URL.
//! Payment-mode Checkout (AI credits), PaymentIntents and their test hooks
//! are in `stripe_payments.rs`: `POST /v1/payment_intents`, and
//! `POST /_test/payment_intents/{id}/{authenticate,refund,dispute}`. The
//! pay page takes `card` (a Stripe test card: visa, authenticationRequired,
//! chargeDeclined) for the card a payment saves.
//! `POST /_test/events/resend {"type"}` delivers that type's events again.
//! `POST /_test/subscriptions/{id}` with `{"status": …}` sends the
//! `customer.subscription.updated` of a status change (dunning by hand).
//! `GET`/`POST /v1/customers/{id}` show a customer and change its email.
//! `POST /v1/subscriptions/{id}` (`cancel_at_period_end`) and `DELETE
//! /v1/subscriptions/{id}` update or cancel a subscription as Stripe does,
//! answering the subscription and sending its `updated` or `deleted`
//! event; `GET /v1/subscriptions/{id}` shows it (the tests read it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[path = "stripe_payments.rs"]
mod payments;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "STRIPE_STANDIN_LISTEN", default_value = "127.0.0.1:12111")]
    listen: SocketAddr,
    /// Where the webhooks go (the scheduler's `/api/billing/webhook`).
    #[arg(long, env = "STRIPE_STANDIN_WEBHOOK_URL")]
    webhook_url: String,
    /// The secret the webhooks are signed with.
    #[arg(long, env = "STRIPE_STANDIN_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: String,
    /// Stripe's sample objects.
    #[arg(long, env = "STRIPE_STANDIN_FIXTURES")]
    fixtures: PathBuf,
}

struct Session {
    object: Value,
    /// Subscription mode: the price subscribed to.
    price: String,
    /// Payment mode: the amount in cents and the PaymentIntent's metadata.
    payment: Option<(i64, Value)>,
}

struct Stand {
    args: Args,
    base: String,
    http: reqwest::Client,
    sessions: Mutex<HashMap<String, Session>>,
    /// Idempotency key → the object first created with it.
    created: Mutex<HashMap<String, Value>>,
    subscriptions: Mutex<HashMap<String, Value>>,
    customers: Mutex<HashMap<String, Value>>,
    intents: Mutex<HashMap<String, Value>>,
    /// Every event sent, for `POST /_test/events/resend`.
    sent: Mutex<Vec<Value>>,
}

type Shared = Arc<Stand>;

fn fixture(s: &Stand, name: &str) -> Value {
    let path = s.args.fixtures.join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_default()).unwrap_or(json!({}))
}

fn id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A refused parameter: its name and why.
struct Invalid(String, String);

fn invalid(param: &str, message: &str) -> Invalid {
    Invalid(param.to_owned(), message.to_owned())
}

impl IntoResponse for Invalid {
    /// Stripe's error shape.
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"type": "invalid_request_error", "param": self.0, "message": self.1}});
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| k.starts_with("sk_"))
}

fn form(body: &[u8]) -> HashMap<String, String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Checks the API key, then creates with `make`, answering a repeated
/// idempotency key with the first object.
fn once(s: &Stand, headers: &HeaderMap, make: impl FnOnce() -> Result<Value, Invalid>) -> Response {
    if !authorized(headers) {
        let body = json!({"error": {"type": "invalid_request_error", "message": "no API key"}});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(k) = &key {
        if let Some(v) = s.created.lock().unwrap().get(k) {
            return Json(v.clone()).into_response();
        }
    }
    match make() {
        Ok(v) => {
            if let Some(k) = key {
                s.created.lock().unwrap().insert(k, v.clone());
            }
            Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn customers(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let f = form(&body);
    once(&s, &headers, || {
        let email = f
            .get("email")
            .ok_or_else(|| invalid("email", "email is required"))?;
        let mut c = fixture(&s, "customer");
        c["id"] = json!(id("cus"));
        c["email"] = json!(email);
        c["name"] = json!(f.get("name"));
        c["metadata"] = json!({"account": f.get("metadata[account]")});
        let id = c["id"].as_str().unwrap_or_default().to_owned();
        s.customers.lock().unwrap().insert(id, c.clone());
        Ok(c)
    })
}

/// `GET /v1/customers/{id}`, and `POST` with `email` to change it.
async fn customer(
    State(s): State<Shared>,
    method: axum::http::Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "no API key").into_response();
    }
    let mut customers = s.customers.lock().unwrap();
    let Some(c) = customers.get_mut(&id) else {
        let body = json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
            "param": "id", "message": format!("No such customer: '{id}'")}});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    };
    if method == axum::http::Method::POST {
        if let Some(email) = form(&body).get("email") {
            c["email"] = json!(email);
        }
    }
    Json(c.clone()).into_response()
}

async fn checkout_sessions(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let f = form(&body);
    once(&s, &headers, || {
        let need = |k: &str| {
            f.get(k)
                .cloned()
                .ok_or_else(|| invalid(k, &format!("{k} is required")))
        };
        let mode = f.get("mode").cloned().unwrap_or_default();
        let (price, payment, metadata) = match mode.as_str() {
            "subscription" => (need("line_items[0][price]")?, None, json!({})),
            "payment" => {
                let (amount, intent_metadata, metadata) =
                    payments::session_from_form(&f).map_err(|m| invalid("line_items", &m))?;
                (String::new(), Some((amount, intent_metadata)), metadata)
            }
            _ => return Err(invalid("mode", "mode must be subscription or payment")),
        };
        let customer = need("customer")?;
        let (success, cancel, account) = (
            need("success_url")?,
            need("cancel_url")?,
            need("client_reference_id")?,
        );
        let session_id = id("cs_test");
        let mut cs = fixture(&s, "checkout_session");
        cs["id"] = json!(session_id);
        cs["customer"] = json!(customer);
        cs["client_reference_id"] = json!(account);
        cs["mode"] = json!(mode);
        cs["metadata"] = metadata;
        cs["status"] = json!("open");
        cs["payment_status"] = json!("unpaid");
        cs["subscription"] = json!(null);
        cs["success_url"] = json!(success);
        cs["cancel_url"] = json!(cancel);
        cs["url"] = json!(format!("{}/pay/{session_id}", s.base));
        s.sessions.lock().unwrap().insert(
            session_id,
            Session {
                object: cs.clone(),
                price,
                payment,
            },
        );
        Ok(cs)
    })
}

async fn portal_sessions(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let f = form(&body);
    once(&s, &headers, || {
        let customer = f
            .get("customer")
            .ok_or_else(|| invalid("customer", "customer is required"))?;
        let mut p = fixture(&s, "billing_portal_session");
        p["id"] = json!(id("bps"));
        p["customer"] = json!(customer);
        p["return_url"] = json!(f.get("return_url"));
        p["url"] = json!(format!("{}/portal/{customer}", s.base));
        Ok(p)
    })
}

async fn pay_page(State(s): State<Shared>, Path(session): Path<String>) -> Response {
    if !s.sessions.lock().unwrap().contains_key(&session) {
        return (StatusCode::NOT_FOUND, "no such checkout session").into_response();
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Checkout (local Stripe stand-in)</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:30rem;margin:4rem auto\">\
         <h1>Local checkout</h1><p>No card is charged: this is the development stand-in for Stripe.</p>\
         <form method=\"post\" action=\"/pay/{session}\"><label>Test card <select name=\"card\" id=\"card\">\
         <option value=\"visa\">visa</option><option value=\"authenticationRequired\">authenticationRequired</option>\
         <option value=\"chargeDeclined\">chargeDeclined</option></select></label> \
         <button id=\"pay\" type=\"submit\">Pay</button></form></body></html>"
    ))
    .into_response()
}

/// Signs and posts one event, as Stripe does.
async fn send(s: &Stand, kind: &str, object: Value) -> anyhow::Result<()> {
    let mut e = fixture(s, "event");
    e["id"] = json!(id("evt"));
    e["type"] = json!(kind);
    e["created"] = json!(chrono_now());
    e["api_version"] = json!(null);
    e["data"] = json!({"object": object});
    s.sent.lock().unwrap().push(e.clone());
    deliver(s, &e).await
}

/// Signs `e` now and posts it to the webhook URL.
async fn deliver(s: &Stand, e: &Value) -> anyhow::Result<()> {
    let payload = e.to_string();
    let signature =
        stripe_webhook::Webhook::generate_test_header(&payload, &s.args.webhook_secret, None);
    let r = s
        .http
        .post(&s.args.webhook_url)
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(payload)
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "the webhook answered {}",
        r.status()
    );
    Ok(())
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn pay(
    State(s): State<Shared>,
    Path(session): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(Session {
        mut object,
        price,
        payment,
    }) = s.sessions.lock().unwrap().remove(&session)
    else {
        return (StatusCode::NOT_FOUND, "no such checkout session").into_response();
    };
    if let Some((amount, intent_metadata)) = payment {
        let card = form(&body)
            .get("card")
            .cloned()
            .unwrap_or_else(|| "visa".into());
        let success = object["success_url"].as_str().unwrap_or("/").to_owned();
        if let Err(e) = payments::pay_session(&s, object, amount, intent_metadata, &card).await {
            return (StatusCode::BAD_GATEWAY, format!("webhooks: {e}")).into_response();
        }
        return Redirect::to(&success).into_response();
    }
    let sub_id = id("sub");
    let mut sub = fixture(&s, "subscription");
    sub["id"] = json!(sub_id);
    sub["customer"] = object["customer"].clone();
    sub["status"] = json!("active");
    sub["cancellation_details"]["reason"] = json!(null);
    sub["items"]["data"][0]["price"]["id"] = json!(price);
    sub["items"]["data"][0]["current_period_end"] = json!(chrono_now() + 30 * 24 * 3600);
    object["status"] = json!("complete");
    object["payment_status"] = json!("paid");
    object["subscription"] = json!(sub_id);
    let success = object["success_url"].as_str().unwrap_or("/").to_owned();
    s.subscriptions.lock().unwrap().insert(sub_id, sub.clone());
    for (kind, obj) in [
        ("checkout.session.completed", object),
        ("customer.subscription.created", sub),
    ] {
        if let Err(e) = send(&s, kind, obj).await {
            return (StatusCode::BAD_GATEWAY, format!("webhook {kind}: {e}")).into_response();
        }
    }
    Redirect::to(&success).into_response()
}

/// The stored subscription, if it exists.
fn stored(s: &Stand, sub_id: &str) -> Option<Value> {
    s.subscriptions.lock().unwrap().get(sub_id).cloned()
}

/// Stripe's answer for an unknown subscription.
fn missing(sub_id: &str) -> Response {
    let body = json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
        "param": "id", "message": format!("No such subscription: '{sub_id}'")}});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn get_subscription(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(sub_id): Path<String>,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "no API key").into_response();
    }
    match stored(&s, &sub_id) {
        Some(sub) => Json(sub).into_response(),
        None => missing(&sub_id),
    }
}

/// `cancel_at_period_end=true|false`: the subscription ends with its
/// period (or no longer does); `customer.subscription.updated` follows.
async fn update_subscription(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(sub_id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "no API key").into_response();
    }
    let Some(mut sub) = stored(&s, &sub_id) else {
        return missing(&sub_id);
    };
    let params = form(&body);
    match params.get("cancel_at_period_end").map(String::as_str) {
        Some("true") => {
            sub["cancel_at_period_end"] = json!(true);
            sub["cancel_at"] = sub["items"]["data"][0]["current_period_end"].clone();
            sub["cancellation_details"]["reason"] = json!("cancellation_requested");
        }
        Some("false") => {
            sub["cancel_at_period_end"] = json!(false);
            sub["cancel_at"] = json!(null);
            sub["cancellation_details"]["reason"] = json!(null);
        }
        Some(_) => {
            return invalid("cancel_at_period_end", "Invalid boolean").into_response();
        }
        None => {}
    }
    s.subscriptions.lock().unwrap().insert(sub_id, sub.clone());
    if let Err(e) = send(&s, "customer.subscription.updated", sub.clone()).await {
        return (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
    }
    Json(sub).into_response()
}

/// Cancels at once: `status: canceled`; `customer.subscription.deleted`
/// follows.
async fn cancel_subscription(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(sub_id): Path<String>,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "no API key").into_response();
    }
    let Some(mut sub) = stored(&s, &sub_id) else {
        return missing(&sub_id);
    };
    if sub["status"] == "canceled" {
        return Json(sub).into_response();
    }
    sub["status"] = json!("canceled");
    sub["canceled_at"] = json!(chrono_now());
    sub["ended_at"] = json!(chrono_now());
    sub["cancellation_details"]["reason"] = json!("cancellation_requested");
    s.subscriptions.lock().unwrap().insert(sub_id, sub.clone());
    if let Err(e) = send(&s, "customer.subscription.deleted", sub.clone()).await {
        return (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
    }
    Json(sub).into_response()
}

/// Delivers again every event of `{"type": …}` sent so far (same ids,
/// signed anew), as Stripe does when it is not sure a delivery landed.
async fn resend(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    let kind = body["type"].as_str().unwrap_or_default();
    let again: Vec<Value> = s
        .sent
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == kind)
        .cloned()
        .collect();
    for e in &again {
        if let Err(err) = deliver(&s, e).await {
            return (StatusCode::BAD_GATEWAY, err.to_string()).into_response();
        }
    }
    Json(json!({"resent": again.len()})).into_response()
}

/// Moves a subscription to another status and sends the update.
async fn set_status(
    State(s): State<Shared>,
    Path(sub_id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let Some(mut sub) = s.subscriptions.lock().unwrap().get(&sub_id).cloned() else {
        return (StatusCode::NOT_FOUND, "no such subscription").into_response();
    };
    sub["status"] = body["status"].clone();
    s.subscriptions.lock().unwrap().insert(sub_id, sub.clone());
    match send(&s, "customer.subscription.updated", sub).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let base = format!("http://{}", listener.local_addr()?);
    let stand = Arc::new(Stand {
        args,
        base: base.clone(),
        http: reqwest::Client::new(),
        sessions: Mutex::default(),
        created: Mutex::default(),
        subscriptions: Mutex::default(),
        customers: Mutex::default(),
        intents: Mutex::default(),
        sent: Mutex::default(),
    });
    let app = Router::new()
        .route("/v1/customers", post(customers))
        .route("/v1/customers/{id}", get(customer).post(customer))
        .route("/v1/checkout/sessions", post(checkout_sessions))
        .route("/v1/billing_portal/sessions", post(portal_sessions))
        .route("/pay/{session}", get(pay_page).post(pay))
        .route(
            "/v1/subscriptions/{id}",
            get(get_subscription)
                .post(update_subscription)
                .delete(cancel_subscription),
        )
        .route("/_test/subscriptions/{id}", post(set_status))
        .route("/_test/events/resend", post(resend))
        .route("/v1/payment_intents", post(payments::create_intent))
        .route(
            "/_test/payment_intents/{id}/authenticate",
            post(payments::authenticate),
        )
        .route("/_test/payment_intents/{id}/refund", post(payments::refund))
        .route(
            "/_test/payment_intents/{id}/dispute",
            post(payments::dispute),
        )
        .with_state(stand);
    eprintln!("stripe stand-in listening on {base}");
    axum::serve(listener, app).await?;
    Ok(())
}
