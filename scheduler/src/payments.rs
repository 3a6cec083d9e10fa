//! The payment provider as billing needs it (a leaf: `app` holds it,
//! `billing` uses it): one narrow trait (create a
//! customer and change its email, a subscription Checkout and a portal
//! session, end a subscription at its period's end or now, a payment-mode
//! Checkout for AI credits and an off-session charge of the saved card), Stripe's
//! implementation over async-stripe, and an in-memory fake for unit tests.
//! Nothing outside this module sees a Stripe type. Every create carries an
//! idempotency key, so a retried request never makes a second customer or
//! session.

use std::future::Future;

use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::subscription::{CancelSubscription, UpdateSubscription};
use stripe_checkout::checkout_session::{CreateCheckoutSession, CreateCheckoutSessionLineItems};
use stripe_core::customer::{CreateCustomer, UpdateCustomer};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The `--stripe-secret-key` and `--stripe-api-base` flags: billing's
/// checkout and portal are on with a key.
#[derive(Clone, Debug, clap::Args)]
pub struct StripeFlags {
    /// Stripe's secret key (`sk_…`); billing's checkout and portal answer
    /// 503 billing_disabled without it.
    #[arg(long, env = "CLAWDEPLOY_STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<String>,
    /// Stripe's API base (the local stand-in's address in development).
    #[arg(
        long,
        env = "CLAWDEPLOY_STRIPE_API_BASE",
        default_value = "https://api.stripe.com/"
    )]
    pub stripe_api_base: String,
}

/// A customer to create, for one account.
pub struct NewCustomer<'a> {
    pub account: Uuid,
    pub email: &'a str,
    pub name: &'a str,
}

/// A subscription-mode Checkout for one account.
pub struct NewCheckout<'a> {
    pub account: Uuid,
    pub customer: &'a str,
    pub price: &'a str,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    /// Same key, same session (a double click, a retried request).
    pub idempotency_key: String,
}

/// A payment-mode Checkout buying AI credits for one account.
pub struct NewCreditsCheckout<'a> {
    pub account: Uuid,
    pub customer: &'a str,
    pub amount_cents: i64,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    pub idempotency_key: String,
}

/// An off-session charge of a saved card, for AI credits.
pub struct OffSessionCharge<'a> {
    pub account: Uuid,
    pub customer: &'a str,
    pub payment_method: &'a str,
    pub amount_cents: i64,
    pub idempotency_key: String,
}

/// How an off-session charge went. The credits move only when the
/// `payment_intent.succeeded` webhook arrives, whatever this says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charged {
    /// Paid (or being processed); the webhook follows.
    Accepted { payment_intent: String },
    /// The bank asks the customer to authenticate (3-D Secure): the page
    /// confirms the PaymentIntent with this secret.
    RequiresAction {
        payment_intent: String,
        client_secret: String,
    },
    /// The card was declined; Stripe's reason.
    Declined { reason: String },
}

/// What a PaymentIntent's metadata says of a credits purchase.
pub const CREDITS_PURPOSE: &str = "credits";

pub trait PaymentProvider: Send + Sync + 'static {
    /// Creates the customer; returns its id.
    fn create_customer(&self, c: NewCustomer<'_>) -> impl Future<Output = Result<String>> + Send;
    /// Returns the Checkout page's URL.
    fn create_checkout(&self, c: NewCheckout<'_>) -> impl Future<Output = Result<String>> + Send;
    /// Returns the customer portal's URL.
    fn create_portal(
        &self,
        customer: &str,
        return_url: &str,
    ) -> impl Future<Output = Result<String>> + Send;
    /// Sets whether the subscription ends with its current period (an
    /// account deleted, or its deletion undone).
    fn cancel_at_period_end(
        &self,
        subscription: &str,
        cancel: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Ends the subscription now (an account purged).
    fn cancel_now(&self, subscription: &str) -> impl Future<Output = Result<()>> + Send;
    /// Gives the customer the account's new email address.
    fn update_customer_email(
        &self,
        customer: &str,
        email: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// A payment-mode Checkout for AI credits (it saves the card for
    /// off-session top-ups); returns its page's URL.
    fn create_credits_checkout(
        &self,
        c: NewCreditsCheckout<'_>,
    ) -> impl Future<Output = Result<String>> + Send;
    /// Charges a saved card off-session (a PaymentIntent confirmed now).
    fn charge_off_session(
        &self,
        c: OffSessionCharge<'_>,
    ) -> impl Future<Output = Result<Charged>> + Send;
}

/// The metadata a credits PaymentIntent carries: whose, what for, and how
/// it was paid (`checkout` or `top_up`).
fn credits_metadata(account: Uuid, via: &str) -> std::collections::HashMap<String, String> {
    [
        ("account".to_owned(), account.to_string()),
        ("purpose".to_owned(), CREDITS_PURPOSE.to_owned()),
        ("via".to_owned(), via.to_owned()),
    ]
    .into()
}

/// Stripe, through async-stripe (rustls with ring, like the rest).
pub struct StripeProvider {
    client: Client,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "a Stripe call failed");
    Error::Disabled {
        code: "billing_unavailable",
        message: "the payment provider did not answer; try again shortly".into(),
    }
}

fn key(k: impl AsRef<str>) -> Result<RequestStrategy> {
    IdempotencyKey::new(k)
        .map(RequestStrategy::Idempotent)
        .map_err(Error::internal)
}

impl StripeProvider {
    /// `base_url` is Stripe's API (or the local stand-in's).
    pub fn new(secret_key: &str, base_url: &str) -> Result<Self> {
        let client = ClientBuilder::new(secret_key)
            .url(base_url)
            .build()
            .map_err(Error::internal)?;
        Ok(StripeProvider { client })
    }
}

impl PaymentProvider for StripeProvider {
    async fn create_customer(&self, c: NewCustomer<'_>) -> Result<String> {
        let customer = CreateCustomer::new()
            .email(c.email)
            .name(c.name)
            .metadata([("account".to_owned(), c.account.to_string())])
            .customize()
            .request_strategy(key(format!("customer-{}", c.account))?)
            .send(&self.client)
            .await
            .map_err(unavailable)?;
        Ok(customer.id.to_string())
    }

    async fn create_checkout(&self, c: NewCheckout<'_>) -> Result<String> {
        let mut item = CreateCheckoutSessionLineItems::new();
        item.price = Some(c.price.to_owned());
        item.quantity = Some(1);
        let session = CreateCheckoutSession::new()
            .mode(stripe_shared::CheckoutSessionMode::Subscription)
            .customer(c.customer)
            .client_reference_id(c.account.to_string())
            .line_items(vec![item])
            .success_url(c.success_url)
            .cancel_url(c.cancel_url)
            .customize()
            .request_strategy(key(&c.idempotency_key)?)
            .send(&self.client)
            .await
            .map_err(unavailable)?;
        session.url.ok_or_else(|| {
            Error::Internal("Stripe returned a Checkout Session without a URL".into())
        })
    }

    async fn create_portal(&self, customer: &str, return_url: &str) -> Result<String> {
        let session = CreateBillingPortalSession::new()
            .customer(customer)
            .return_url(return_url)
            .customize()
            .request_strategy(key(Uuid::new_v4().to_string())?)
            .send(&self.client)
            .await
            .map_err(unavailable)?;
        Ok(session.url)
    }

    async fn cancel_at_period_end(&self, subscription: &str, cancel: bool) -> Result<()> {
        UpdateSubscription::new(subscription)
            .cancel_at_period_end(cancel)
            .customize()
            .request_strategy(key(format!(
                "cancel-at-end-{subscription}-{cancel}-{}",
                Uuid::new_v4()
            ))?)
            .send(&self.client)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn cancel_now(&self, subscription: &str) -> Result<()> {
        CancelSubscription::new(subscription)
            .customize()
            .request_strategy(key(format!("cancel-{subscription}"))?)
            .send(&self.client)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn update_customer_email(&self, customer: &str, email: &str) -> Result<()> {
        UpdateCustomer::new(customer)
            .email(email)
            .customize()
            .request_strategy(key(Uuid::new_v4().to_string())?)
            .send(&self.client)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn create_credits_checkout(&self, c: NewCreditsCheckout<'_>) -> Result<String> {
        self.credits_checkout(c).await
    }

    async fn charge_off_session(&self, c: OffSessionCharge<'_>) -> Result<Charged> {
        self.off_session(c).await
    }
}

impl StripeProvider {
    async fn credits_checkout(&self, c: NewCreditsCheckout<'_>) -> Result<String> {
        use stripe_checkout::checkout_session::{
            CreateCheckoutSessionLineItemsPriceData, CreateCheckoutSessionPaymentIntentData,
            CreateCheckoutSessionPaymentIntentDataSetupFutureUsage, ProductData,
        };
        let mut price = CreateCheckoutSessionLineItemsPriceData::new(stripe_types::Currency::USD);
        price.unit_amount = Some(c.amount_cents);
        price.product_data = Some(ProductData::new("ClawDeploy AI credits"));
        let mut item = CreateCheckoutSessionLineItems::new();
        item.price_data = Some(price);
        item.quantity = Some(1);
        let mut intent = CreateCheckoutSessionPaymentIntentData::new();
        intent.setup_future_usage =
            Some(CreateCheckoutSessionPaymentIntentDataSetupFutureUsage::OffSession);
        intent.metadata = Some(credits_metadata(c.account, "checkout"));
        let session = CreateCheckoutSession::new()
            .mode(stripe_shared::CheckoutSessionMode::Payment)
            .customer(c.customer)
            .client_reference_id(c.account.to_string())
            .line_items(vec![item])
            .payment_intent_data(intent)
            .metadata(credits_metadata(c.account, "checkout"))
            .success_url(c.success_url)
            .cancel_url(c.cancel_url)
            .customize()
            .request_strategy(key(&c.idempotency_key)?)
            .send(&self.client)
            .await
            .map_err(unavailable)?;
        session.url.ok_or_else(|| {
            Error::Internal("Stripe returned a Checkout Session without a URL".into())
        })
    }

    async fn off_session(&self, c: OffSessionCharge<'_>) -> Result<Charged> {
        use stripe_core::payment_intent::{CreatePaymentIntent, CreatePaymentIntentOffSession};
        use stripe_shared::PaymentIntentStatus;
        let sent = CreatePaymentIntent::new(c.amount_cents, stripe_types::Currency::USD)
            .customer(c.customer)
            .payment_method(c.payment_method)
            .off_session(CreatePaymentIntentOffSession::Bool(true))
            .confirm(true)
            .metadata(credits_metadata(c.account, "top_up"))
            .customize()
            .request_strategy(key(&c.idempotency_key)?)
            .send(&self.client)
            .await;
        let needs_action = |pi: &stripe_shared::PaymentIntent| {
            pi.client_secret
                .clone()
                .map(|client_secret| Charged::RequiresAction {
                    payment_intent: pi.id.to_string(),
                    client_secret,
                })
        };
        match sent {
            Ok(pi) => match pi.status {
                PaymentIntentStatus::RequiresAction => needs_action(&pi).ok_or_else(|| {
                    Error::Internal("a PaymentIntent needing action has no client secret".into())
                }),
                PaymentIntentStatus::Succeeded | PaymentIntentStatus::Processing => {
                    Ok(Charged::Accepted {
                        payment_intent: pi.id.to_string(),
                    })
                }
                other => Ok(Charged::Declined {
                    reason: format!("the payment is {other}"),
                }),
            },
            // An off-session charge the bank wants authenticated, or a
            // decline, is a card error (402) that carries the PaymentIntent.
            Err(stripe::StripeError::Stripe(e, 402)) => {
                let action = e
                    .payment_intent
                    .as_ref()
                    .filter(|pi| pi.status == PaymentIntentStatus::RequiresAction)
                    .and_then(needs_action);
                Ok(action.unwrap_or_else(|| Charged::Declined {
                    reason: e
                        .message
                        .clone()
                        .unwrap_or_else(|| "the card was declined".into()),
                }))
            }
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// An in-memory provider for tests: it remembers what it was asked.
#[derive(Default)]
pub struct FakeProvider {
    pub calls: std::sync::Mutex<Vec<String>>,
}

impl FakeProvider {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl PaymentProvider for FakeProvider {
    async fn create_customer(&self, c: NewCustomer<'_>) -> Result<String> {
        self.record(format!("customer {} {} {}", c.account, c.email, c.name));
        Ok(format!("cus_fake_{}", c.account.simple()))
    }

    async fn create_checkout(&self, c: NewCheckout<'_>) -> Result<String> {
        self.record(format!(
            "checkout {} {} {} {}",
            c.customer, c.price, c.account, c.idempotency_key
        ));
        Ok(format!("https://checkout.fake/{}", c.idempotency_key))
    }

    async fn create_portal(&self, customer: &str, return_url: &str) -> Result<String> {
        self.record(format!("portal {customer} {return_url}"));
        Ok(format!("https://portal.fake/{customer}"))
    }

    async fn cancel_at_period_end(&self, subscription: &str, cancel: bool) -> Result<()> {
        self.record(format!("cancel_at_period_end {subscription} {cancel}"));
        Ok(())
    }

    async fn cancel_now(&self, subscription: &str) -> Result<()> {
        self.record(format!("cancel_now {subscription}"));
        Ok(())
    }

    async fn update_customer_email(&self, customer: &str, email: &str) -> Result<()> {
        self.record(format!("customer_email {customer} {email}"));
        Ok(())
    }

    async fn create_credits_checkout(&self, c: NewCreditsCheckout<'_>) -> Result<String> {
        self.record(format!(
            "credits_checkout {} {} {}",
            c.customer, c.amount_cents, c.idempotency_key
        ));
        Ok(format!("https://checkout.fake/{}", c.idempotency_key))
    }

    async fn charge_off_session(&self, c: OffSessionCharge<'_>) -> Result<Charged> {
        self.record(format!(
            "off_session {} {} {}",
            c.customer, c.payment_method, c.amount_cents
        ));
        Ok(Charged::Accepted {
            payment_intent: format!("pi_fake_{}", c.idempotency_key),
        })
    }
}
