//! Starting a payment: the account's Stripe customer (made once, the
//! account id in its metadata), then a subscription Checkout for a paid
//! tier, or the customer portal. Redirects go only to the configured public
//! origin (no open redirect).

use uuid::Uuid;

use crate::app::Config;
use crate::error::{Error, Result};
use crate::model::Tier;
use crate::payments::{NewCheckout, NewCustomer, PaymentProvider};

/// Refuses a redirect URL that does not lead back to our own origin.
pub fn check_redirect(cfg: &Config, field: &'static str, url: &str) -> Result<()> {
    let origin = cfg.public_origin.trim_end_matches('/');
    let ok = url == origin
        || url
            .strip_prefix(origin)
            .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('?'));
    if ok && !url.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(Error::Invalid {
            field,
            message: format!("must be on {origin}"),
        })
    }
}

/// The account's Stripe customer, created on first use.
pub(crate) async fn customer_of<P: PaymentProvider>(
    db: &sqlx::PgPool,
    provider: &P,
    account: Uuid,
) -> Result<String> {
    let (existing, email, name): (Option<String>, String, String) = sqlx::query_as(
        "SELECT b.customer_id, u.email, u.name FROM users u
           LEFT JOIN billing_accounts b ON b.user_id = u.id WHERE u.id = $1",
    )
    .bind(account)
    .fetch_one(db)
    .await?;
    if let Some(c) = existing {
        return Ok(c);
    }
    // Two requests at once get the same customer: the create is idempotent
    // per account, and the first stored id wins.
    let created = provider
        .create_customer(NewCustomer {
            account,
            email: &email,
            name: &name,
        })
        .await?;
    Ok(sqlx::query_scalar(
        "INSERT INTO billing_accounts (user_id, customer_id) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE
            SET customer_id = COALESCE(billing_accounts.customer_id, EXCLUDED.customer_id)
         RETURNING customer_id",
    )
    .bind(account)
    .bind(&created)
    .fetch_one(db)
    .await?)
}

/// A Checkout page's URL for subscribing `account` to `tier`.
#[allow(clippy::too_many_arguments)]
pub async fn checkout<P: PaymentProvider>(
    db: &sqlx::PgPool,
    cfg: &Config,
    provider: &P,
    account: Uuid,
    tier: Tier,
    success_url: &str,
    cancel_url: &str,
    idempotency_key: Option<&str>,
) -> Result<String> {
    crate::accounts::verify::require_verified(db, account).await?;
    check_redirect(cfg, "successUrl", success_url)?;
    check_redirect(cfg, "cancelUrl", cancel_url)?;
    let price = match tier {
        Tier::Free => None,
        Tier::Pro => cfg.stripe_price_pro.as_deref(),
        Tier::Team => cfg.stripe_price_team.as_deref(),
    }
    .ok_or(Error::Invalid {
        field: "tier",
        message: "not a paid tier with a configured price".into(),
    })?;
    let customer = customer_of(db, provider, account).await?;
    provider
        .create_checkout(NewCheckout {
            account,
            customer: &customer,
            price,
            success_url,
            cancel_url,
            idempotency_key: idempotency_key
                .map(|k| format!("checkout-{account}-{k}"))
                .unwrap_or_else(|| format!("checkout-{}", Uuid::new_v4())),
        })
        .await
}

/// The customer portal's URL; the account must have paid before.
pub async fn portal<P: PaymentProvider>(
    db: &sqlx::PgPool,
    cfg: &Config,
    provider: &P,
    account: Uuid,
    return_url: &str,
) -> Result<String> {
    check_redirect(cfg, "returnUrl", return_url)?;
    let customer: Option<String> =
        sqlx::query_scalar("SELECT customer_id FROM billing_accounts WHERE user_id = $1")
            .bind(account)
            .fetch_optional(db)
            .await?
            .flatten();
    let customer = customer.ok_or(Error::Conflict {
        code: "no_customer",
        message: "this account has no billing history yet: subscribe first".into(),
    })?;
    provider.create_portal(&customer, return_url).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_stay_on_our_origin() {
        let cfg = Config {
            public_origin: "https://app.clawdeploy.com".into(),
            ..Config::default()
        };
        for ok in [
            "https://app.clawdeploy.com",
            "https://app.clawdeploy.com/",
            "https://app.clawdeploy.com/?upgraded=1",
        ] {
            assert!(check_redirect(&cfg, "successUrl", ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://app.clawdeploy.com.evil.example/",
            "https://evil.example/?https://app.clawdeploy.com",
            "http://app.clawdeploy.com/",
            "https://app.clawdeploy.com@evil.example/",
            "//evil.example",
            "https://app.clawdeploy.com/\n",
        ] {
            assert!(check_redirect(&cfg, "successUrl", bad).is_err(), "{bad}");
        }
    }
}
