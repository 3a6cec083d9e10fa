//! Stripe's events about AI credits (billing/webhook.rs hands them here,
//! inside the delivery's transaction): a purchase paid through Checkout or
//! off-session adds its credits once per PaymentIntent; a refund or dispute
//! takes back what it names.

use sqlx::{Postgres, Transaction};
use stripe_webhook::EventObject;
use uuid::Uuid;

use super::outcome::Outcome;
use crate::audit::audit;
use crate::error::Result;

/// Applies `object` when it is about credits; `None` when it is not.
pub(super) async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    object: &EventObject,
) -> Result<Option<Outcome>> {
    let outcome = match object {
        EventObject::CheckoutSessionCompleted(s) if is_credits(s.metadata.as_ref()) => {
            let account = s
                .client_reference_id
                .as_deref()
                .and_then(|r| r.parse().ok());
            match (account, &s.payment_intent, s.amount_total) {
                (Some(account), Some(pi), Some(amount)) => {
                    purchase(tx, account, pi.id().as_str(), amount, "checkout", None).await?
                }
                _ => Outcome::UnknownAccount,
            }
        }
        EventObject::PaymentIntentSucceeded(pi) if is_credits(Some(&pi.metadata)) => {
            let account = pi.metadata.get("account").and_then(|a| a.parse().ok());
            let via = match pi.metadata.get("via").map(String::as_str) {
                Some("checkout") => "checkout",
                _ => "top_up",
            };
            let card = pi
                .payment_method
                .as_ref()
                .map(|m| m.id().as_str().to_owned());
            match account {
                Some(account) => {
                    let (id, amount) = (pi.id.as_str(), pi.amount_received.max(pi.amount));
                    purchase(tx, account, id, amount, via, card.as_deref()).await?
                }
                None => Outcome::UnknownAccount,
            }
        }
        EventObject::ChargeRefunded(ch) => match &ch.payment_intent {
            Some(pi) => take_back(tx, pi.id().as_str(), ch.amount_refunded, "refund").await?,
            None => Outcome::Ignored,
        },
        EventObject::ChargeDisputeCreated(d) => match &d.payment_intent {
            Some(pi) => take_back(tx, pi.id().as_str(), d.amount, "dispute").await?,
            None => Outcome::Ignored,
        },
        _ => return Ok(None),
    };
    Ok(Some(outcome))
}

/// Whether a Stripe object's metadata marks it as a credits purchase.
fn is_credits(metadata: Option<&std::collections::HashMap<String, String>>) -> bool {
    metadata
        .and_then(|m| m.get("purpose"))
        .is_some_and(|p| p == crate::payments::CREDITS_PURPOSE)
}

/// A credits purchase paid: its credits, once per PaymentIntent.
async fn purchase(
    tx: &mut Transaction<'_, Postgres>,
    account: Uuid,
    payment_intent: &str,
    amount_cents: i64,
    kind: &'static str,
    card: Option<&str>,
) -> Result<Outcome> {
    let p = crate::billing::credits::Purchase {
        account,
        payment_intent,
        amount_cents,
        kind,
        payment_method: card,
    };
    if !crate::billing::credits::credit(tx, p).await? {
        return Ok(Outcome::Duplicate);
    }
    audit(
        &mut **tx,
        "stripe",
        "credits.purchased",
        &account.to_string(),
        serde_json::json!({"paymentIntent": payment_intent, "amountCents": amount_cents, "via": kind}),
    )
    .await;
    Ok(Outcome::Applied)
}

/// A refund or dispute of a credits purchase: what it names goes back.
async fn take_back(
    tx: &mut Transaction<'_, Postgres>,
    payment_intent: &str,
    total_cents: i64,
    why: &str,
) -> Result<Outcome> {
    match crate::billing::credits::claw_back(tx, payment_intent, total_cents).await? {
        None => Ok(Outcome::Ignored),
        Some((_, 0)) => Ok(Outcome::Duplicate),
        Some((user, micros)) => {
            audit(
                &mut **tx,
                "stripe",
                "credits.taken_back",
                &user.to_string(),
                serde_json::json!({"paymentIntent": payment_intent, "micros": micros, "why": why}),
            )
            .await;
            Ok(Outcome::Applied)
        }
    }
}
