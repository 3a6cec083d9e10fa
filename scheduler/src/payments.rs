//! The payment provider as billing needs it (a leaf: `app` holds it,
//! `billing` uses it): one narrow trait (create a
//! customer and change its email, a subscription Checkout and a portal
//! session, end a subscription at its period's end or now), Stripe's
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
}
