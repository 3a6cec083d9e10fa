//! The Stripe stand-in's payments: payment-mode Checkout (AI credits), its
//! PaymentIntent, off-session PaymentIntents and their outcomes as Stripe's
//! test cards give them (`pm_card_visa` succeeds, `pm_card_authenticationRequired`
//! needs 3-D Secure, `pm_card_chargeDeclined` is declined), and the test
//! hooks that finish an authentication, refund or dispute a payment. Every
//! change sends the event Stripe would, signed as Stripe signs it.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{authorized, chrono_now, fixture, form, id, send, Shared, Stand};

/// A PaymentIntent from Stripe's sample, made ours.
fn intent(
    s: &Stand,
    amount: i64,
    customer: &Value,
    card: &str,
    metadata: Value,
    status: &str,
) -> Value {
    let pi_id = id("pi");
    let mut pi = fixture(s, "payment_intent");
    for null in [
        "next_action",
        "last_payment_error",
        "processing",
        "transfer_data",
        "payment_method_configuration_details",
        "canceled_at",
    ] {
        pi[null] = Value::Null;
    }
    pi["id"] = json!(pi_id);
    pi["client_secret"] = json!(format!("{pi_id}_secret_{}", uuid::Uuid::new_v4().simple()));
    pi["amount"] = json!(amount);
    pi["amount_received"] = json!(if status == "succeeded" { amount } else { 0 });
    pi["currency"] = json!("usd");
    pi["customer"] = customer.clone();
    pi["payment_method"] = json!(card);
    pi["metadata"] = metadata;
    pi["status"] = json!(status);
    pi["created"] = json!(chrono_now());
    pi
}

/// The `metadata[...]` (or `payment_intent_data[metadata][...]`) fields
/// of a form, as an object.
fn metadata_of(f: &std::collections::HashMap<String, String>, prefix: &str) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in f {
        if let Some(name) = k.strip_prefix(prefix).and_then(|r| r.strip_suffix(']')) {
            m.insert(name.to_owned(), json!(v));
        }
    }
    Value::Object(m)
}

/// What a payment-mode Checkout Session keeps from its form.
pub fn session_from_form(
    f: &std::collections::HashMap<String, String>,
) -> Result<(i64, Value, Value), String> {
    let amount = f
        .get("line_items[0][price_data][unit_amount]")
        .and_then(|a| a.parse::<i64>().ok())
        .ok_or("line_items[0][price_data][unit_amount] is required")?;
    if f.get("line_items[0][price_data][currency]")
        .map(String::as_str)
        != Some("usd")
    {
        return Err("line_items[0][price_data][currency] must be usd".into());
    }
    let intent_metadata = metadata_of(f, "payment_intent_data[metadata][");
    let metadata = metadata_of(f, "metadata[");
    Ok((amount, intent_metadata, metadata))
}

/// Pays a payment-mode session with `card` (a test card's name): its
/// PaymentIntent succeeds, the card is saved for off-session use, and
/// `checkout.session.completed` then `payment_intent.succeeded` go out.
pub async fn pay_session(
    s: &Stand,
    mut session: Value,
    amount: i64,
    intent_metadata: Value,
    card: &str,
) -> anyhow::Result<()> {
    let card = format!("pm_card_{card}");
    let pi = intent(
        s,
        amount,
        &session["customer"],
        &card,
        intent_metadata,
        "succeeded",
    );
    session["status"] = json!("complete");
    session["payment_status"] = json!("paid");
    session["payment_intent"] = pi["id"].clone();
    session["amount_total"] = json!(amount);
    session["amount_subtotal"] = json!(amount);
    s.intents
        .lock()
        .unwrap()
        .insert(pi["id"].as_str().unwrap_or_default().to_owned(), pi.clone());
    send(s, "checkout.session.completed", session).await?;
    send(s, "payment_intent.succeeded", pi).await
}

/// `POST /v1/payment_intents` with `confirm=true&off_session=true`: the
/// saved card decides, as Stripe's test cards do.
pub async fn create_intent(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "no API key").into_response();
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(v) = key
        .as_ref()
        .and_then(|k| s.created.lock().unwrap().get(k).cloned())
    {
        return Json(v).into_response();
    }
    let f = form(&body);
    let Some(amount) = f.get("amount").and_then(|a| a.parse::<i64>().ok()) else {
        return super::invalid("amount", "amount is required").into_response();
    };
    let card = f.get("payment_method").cloned().unwrap_or_default();
    let customer = json!(f.get("customer"));
    let metadata = metadata_of(&f, "metadata[");
    let (status, error) = match card.as_str() {
        "pm_card_authenticationRequired" => ("requires_action", Some("authentication_required")),
        "pm_card_chargeDeclined" => ("requires_payment_method", Some("card_declined")),
        _ => ("succeeded", None),
    };
    let mut pi = intent(&s, amount, &customer, &card, metadata, status);
    if status == "requires_action" {
        pi["next_action"] = json!({"type": "use_stripe_sdk", "use_stripe_sdk": {}});
    }
    let pi_id = pi["id"].as_str().unwrap_or_default().to_owned();
    s.intents.lock().unwrap().insert(pi_id, pi.clone());
    let event = match status {
        "succeeded" => Some("payment_intent.succeeded"),
        "requires_action" => Some("payment_intent.requires_action"),
        _ => Some("payment_intent.payment_failed"),
    };
    if let Some(kind) = event {
        // Stripe sends events on its own time, after the answer.
        let (s2, pi2) = (s.clone(), pi.clone());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if let Err(e) = send(&s2, kind, pi2).await {
                eprintln!("stripe stand-in: {kind}: {e}");
            }
        });
    }
    match error {
        None => {
            if let Some(k) = key {
                s.created.lock().unwrap().insert(k, pi.clone());
            }
            Json(pi).into_response()
        }
        Some(code) => {
            let message = match code {
                "authentication_required" => {
                    "This payment requires authentication; the customer must be brought on-session."
                }
                _ => "Your card was declined.",
            };
            let body = json!({"error": {"type": "card_error", "code": code, "message": message,
                                        "decline_code": if code == "card_declined" { json!("generic_decline") } else { json!(code) },
                                        "payment_intent": pi}});
            (StatusCode::PAYMENT_REQUIRED, Json(body)).into_response()
        }
    }
}

fn stored(s: &Stand, pi_id: &str) -> Option<Value> {
    s.intents.lock().unwrap().get(pi_id).cloned()
}

/// The customer completed 3-D Secure: the PaymentIntent succeeds.
pub async fn authenticate(State(s): State<Shared>, Path(pi_id): Path<String>) -> Response {
    let Some(mut pi) = stored(&s, &pi_id) else {
        return (StatusCode::NOT_FOUND, "no such payment intent").into_response();
    };
    pi["status"] = json!("succeeded");
    pi["next_action"] = Value::Null;
    pi["amount_received"] = pi["amount"].clone();
    s.intents.lock().unwrap().insert(pi_id, pi.clone());
    match send(&s, "payment_intent.succeeded", pi).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// Refunds `{"amount": cents}` (all when absent) of a payment:
/// `charge.refunded` with the refunded total.
pub async fn refund(
    State(s): State<Shared>,
    Path(pi_id): Path<String>,
    body: Option<Json<Value>>,
) -> Response {
    let Some(pi) = stored(&s, &pi_id) else {
        return (StatusCode::NOT_FOUND, "no such payment intent").into_response();
    };
    let amount = pi["amount"].as_i64().unwrap_or(0);
    let refunded = body
        .and_then(|Json(b)| b["amount"].as_i64())
        .unwrap_or(amount);
    let mut ch = fixture(&s, "charge");
    ch["id"] = json!(id("ch"));
    ch["payment_intent"] = json!(pi_id);
    ch["customer"] = pi["customer"].clone();
    ch["amount"] = json!(amount);
    ch["amount_captured"] = json!(amount);
    ch["amount_refunded"] = json!(refunded);
    ch["refunded"] = json!(refunded >= amount);
    match send(&s, "charge.refunded", ch).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// The customer disputes the whole payment: `charge.dispute.created`.
pub async fn dispute(State(s): State<Shared>, Path(pi_id): Path<String>) -> Response {
    let Some(pi) = stored(&s, &pi_id) else {
        return (StatusCode::NOT_FOUND, "no such payment intent").into_response();
    };
    let mut d = fixture(&s, "dispute");
    d["id"] = json!(id("dp"));
    d["payment_intent"] = json!(pi_id);
    d["charge"] = json!(id("ch"));
    d["amount"] = pi["amount"].clone();
    d["status"] = json!("needs_response");
    // Nullable in Stripe's API; the sample's card details do not parse as
    // the pinned API version reads them.
    d["payment_method_details"] = Value::Null;
    match send(&s, "charge.dispute.created", d).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
