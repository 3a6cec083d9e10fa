//! The ACME client (instant-acme): the one account, its credentials sealed
//! under the KEK in `acme_accounts`, and one order for one hostname. The
//! order's HTTP-01 answer is handed to a `publish` callback, which puts it
//! on every edge before the CA is told to look. A leaf: what to order and
//! when is `domains::issue`'s.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::Mutex;

use sqlx::PgPool;

use crate::crypto::{aad, SecretBox};

/// Where certificates come from (the `--acme-*` flags).
#[derive(Clone, Debug, clap::Args)]
pub struct AcmeConfig {
    /// The ACME directory certificates for custom domains come from (e.g.
    /// Let's Encrypt's); none: domains are verified but get no certificate.
    // Not required by clap on its own: with no `--acme-*` flag ACME is
    // off; with another one given and this one missing, parsing fails.
    #[arg(
        id = "acme-directory-url",
        long = "acme-directory-url",
        env = "CLAWDEPLOY_ACME_DIRECTORY_URL",
        required = false
    )]
    pub directory_url: String,
    /// A PEM root the ACME directory's own TLS certificate chains to (a
    /// test CA such as pebble); the system's roots when unset.
    #[arg(long = "acme-ca-bundle", env = "CLAWDEPLOY_ACME_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// Contact for the ACME account (`mailto:ops@example.com`).
    #[arg(long = "acme-contact", env = "CLAWDEPLOY_ACME_CONTACT")]
    pub contact: Option<String>,
}

/// Why an order did not produce a certificate.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The CA refused or invalidated it: its reason, for the customer.
    #[error("{0}")]
    Refused(String),
    /// The CA asked to come back later (rate limit, `Retry-After`).
    #[error("the certificate authority asked to retry later: {reason}")]
    Later {
        reason: String,
        after: Option<Duration>,
    },
    /// The CA could not be reached or answered nonsense.
    #[error("the certificate authority is unavailable: {0}")]
    Unavailable(String),
    /// Our side (database, sealing) failed.
    #[error(transparent)]
    Internal(#[from] crate::error::Error),
}

impl From<crate::crypto::SealError> for OrderError {
    fn from(e: crate::crypto::SealError) -> Self {
        OrderError::Internal(e.into())
    }
}

/// What an order produced.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// The account, created or loaded once per process.
pub struct Acme {
    pub cfg: AcmeConfig,
    account: Mutex<Option<Account>>,
}

const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";
const NO_ACCOUNT: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

fn classify(e: instant_acme::Error) -> OrderError {
    match e {
        instant_acme::Error::Api(p) if p.r#type.as_deref() == Some(RATE_LIMITED) => {
            OrderError::Later {
                reason: p.detail.unwrap_or_else(|| "rate limited".into()),
                after: None,
            }
        }
        instant_acme::Error::Api(p) => OrderError::Refused(
            p.detail
                .clone()
                .unwrap_or_else(|| p.r#type.clone().unwrap_or_else(|| p.to_string())),
        ),
        instant_acme::Error::Timeout(at) => OrderError::Later {
            reason: "the order did not complete in time".into(),
            after: at.map(|i| i.saturating_duration_since(std::time::Instant::now())),
        },
        other => OrderError::Unavailable(other.to_string()),
    }
}

/// How long the CA may take to validate and to sign.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(60));

impl Acme {
    pub fn new(cfg: AcmeConfig) -> Self {
        Self {
            cfg,
            account: Mutex::new(None),
        }
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, OrderError> {
        match &self.cfg.ca_bundle {
            Some(p) => Account::builder_with_root(p),
            None => Account::builder(),
        }
        .map_err(|e| OrderError::Unavailable(format!("the ACME HTTP client: {e}")))
    }

    /// The account: from the database, or created at the CA and stored
    /// sealed. Another scheduler that created one first wins.
    async fn account(&self, db: &PgPool, secrets: &SecretBox) -> Result<Account, OrderError> {
        let mut held = self.account.lock().await;
        if let Some(a) = held.as_ref() {
            return Ok(a.clone());
        }
        let url = &self.cfg.directory_url;
        let aad = aad::acme_account(url);
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT credentials_sealed FROM acme_accounts WHERE directory_url = $1",
        )
        .bind(url)
        .fetch_optional(db)
        .await
        .map_err(crate::error::Error::from)?;
        let account = match stored {
            Some(sealed) => {
                let json = secrets.open(&aad, &sealed)?;
                let creds: AccountCredentials = serde_json::from_slice(&json)
                    .map_err(|e| OrderError::Internal(crate::error::Error::internal(e)))?;
                self.builder()?
                    .from_credentials(creds)
                    .await
                    .map_err(classify)?
            }
            None => {
                let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
                let (account, creds) = self
                    .builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        url.clone(),
                        None,
                    )
                    .await
                    .map_err(classify)?;
                let json = serde_json::to_vec(&creds)
                    .map_err(|e| OrderError::Internal(crate::error::Error::internal(e)))?;
                sqlx::query(
                    "INSERT INTO acme_accounts (directory_url, credentials_sealed) VALUES ($1, $2)
                     ON CONFLICT (directory_url) DO UPDATE SET credentials_sealed = EXCLUDED.credentials_sealed",
                )
                .bind(url)
                .bind(secrets.seal(&aad, &json)?)
                .execute(db)
                .await
                .map_err(crate::error::Error::from)?;
                tracing::info!(
                    directory = url,
                    account = account.id(),
                    "ACME account created"
                );
                account
            }
        };
        *held = Some(account.clone());
        Ok(account)
    }

    /// Forgets the account (the CA no longer knows it: a test CA that
    /// restarted), so the next order makes a new one.
    async fn forget_account(&self, db: &PgPool) -> Result<(), OrderError> {
        *self.account.lock().await = None;
        sqlx::query("DELETE FROM acme_accounts WHERE directory_url = $1")
            .bind(&self.cfg.directory_url)
            .execute(db)
            .await
            .map_err(crate::error::Error::from)?;
        Ok(())
    }

    /// Orders a certificate for `hostname`. `publish(token, key_auth)` puts
    /// the HTTP-01 answer on the edges and returns once they serve it.
    pub async fn order<F, Fut>(
        &self,
        db: &PgPool,
        secrets: &SecretBox,
        hostname: &str,
        publish: F,
    ) -> Result<Issued, OrderError>
    where
        F: FnMut(String, String) -> Fut,
        Fut: Future<Output = Result<(), OrderError>>,
    {
        let account = self.account(db, secrets).await?;
        let ids = [Identifier::Dns(hostname.to_owned())];
        let order = match account.new_order(&NewOrder::new(&ids)).await {
            Err(instant_acme::Error::Api(p)) if p.r#type.as_deref() == Some(NO_ACCOUNT) => {
                tracing::warn!(
                    directory = self.cfg.directory_url,
                    "the CA does not know the stored ACME account; creating a new one"
                );
                self.forget_account(db).await?;
                let account = self.account(db, secrets).await?;
                account.new_order(&NewOrder::new(&ids)).await
            }
            other => other,
        };
        let mut order = order.map_err(classify)?;
        self.complete(&mut order, publish).await
    }

    async fn complete<F, Fut>(
        &self,
        order: &mut instant_acme::Order,
        mut publish: F,
    ) -> Result<Issued, OrderError>
    where
        F: FnMut(String, String) -> Fut,
        Fut: Future<Output = Result<(), OrderError>>,
    {
        {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(classify)?;
                match a.status {
                    // Reused: the CA validated this name recently.
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(OrderError::Refused(format!(
                            "the authorization is {other:?}"
                        )))
                    }
                }
                let mut ch = a.challenge(ChallengeType::Http01).ok_or_else(|| {
                    OrderError::Refused("the CA offered no HTTP-01 challenge".into())
                })?;
                let key_auth = ch.key_authorization().as_str().to_owned();
                publish(ch.token.clone(), key_auth).await?;
                ch.set_ready().await.map_err(classify)?;
            }
        }
        let status = order.poll_ready(&POLL).await.map_err(classify)?;
        if status != OrderStatus::Ready {
            return Err(OrderError::Refused(challenge_error(order).await));
        }
        let key_pem = order.finalize().await.map_err(classify)?;
        let chain_pem = order.poll_certificate(&POLL).await.map_err(classify)?;
        Ok(Issued { chain_pem, key_pem })
    }
}

/// The CA's reason an order became invalid: its challenge's error.
async fn challenge_error(order: &mut instant_acme::Order) -> String {
    let mut authzs = order.authorizations();
    while let Some(Ok(mut a)) = authzs.next().await {
        if let Ok(state) = a.refresh().await {
            for c in &state.challenges {
                if let Some(p) = &c.error {
                    return p.detail.clone().unwrap_or_else(|| p.to_string());
                }
            }
        }
    }
    "the certificate authority refused the order".into()
}
