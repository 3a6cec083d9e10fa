//! Mail as the product sends it (a leaf: `app` holds the mailer, the
//! outbox in `outbox.rs` uses it): one narrow trait (send one rendered
//! message), SMTP over lettre (tokio, rustls on ring), an in-memory fake for
//! tests, and the templates (`templates.rs`). A send's failure says whether
//! trying again can help.

pub mod templates;

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use lettre::message::{header, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// A message ready to go: one recipient, a subject, and the same text as
/// plain text and HTML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The server is away, busy or asked to come back (a 4xx): send again
    /// later.
    #[error("mail not sent yet: {0}")]
    Transient(String),
    /// The server refused this message for good (a 5xx: a bad address, a
    /// policy), or it could not be built: sending again will not help.
    #[error("mail refused: {0}")]
    Permanent(String),
}

/// Sends one message.
pub trait Mailer: Send + Sync + 'static {
    fn send(&self, mail: &Rendered) -> impl Future<Output = Result<(), MailError>> + Send;
}

/// The `--smtp-url` and `--mail-from` flags. The server's username and
/// password come from the environment only (`CLAWDEPLOY_SMTP_USERNAME`,
/// `CLAWDEPLOY_SMTP_PASSWORD`), never from the command line, which other
/// users of the host can read.
#[derive(Clone, Debug, clap::Args)]
pub struct MailFlags {
    /// Where mail goes: `smtp://host:port` (plain; `?tls=required` for
    /// STARTTLS) or `smtps://host:port` (TLS). None: mail waits in the
    /// outbox, unsent.
    #[arg(long, env = "CLAWDEPLOY_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// The sender of every mail.
    #[arg(
        long,
        env = "CLAWDEPLOY_MAIL_FROM",
        default_value = "ClawDeploy <noreply@clawdeploy.localhost>"
    )]
    pub mail_from: String,
}

/// Mail over SMTP.
#[derive(Clone)]
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// How long one SMTP conversation may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

impl SmtpMailer {
    /// The mailer the flags describe, or `None` when no server is given.
    pub fn from_flags(flags: &MailFlags) -> Result<Option<Self>, MailError> {
        let Some(url) = flags.smtp_url.as_deref() else {
            return Ok(None);
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| MailError::Permanent(format!("--smtp-url {url:?}: {e}")))?
            .timeout(Some(SMTP_TIMEOUT));
        if let Ok(user) = std::env::var("CLAWDEPLOY_SMTP_USERNAME") {
            let password = std::env::var("CLAWDEPLOY_SMTP_PASSWORD").unwrap_or_default();
            builder = builder.credentials(Credentials::new(user, password));
        }
        let from = flags
            .mail_from
            .parse()
            .map_err(|e| MailError::Permanent(format!("--mail-from {:?}: {e}", flags.mail_from)))?;
        Ok(Some(Self {
            transport: builder.build(),
            from,
        }))
    }

    fn message(&self, mail: &Rendered) -> Result<Message, MailError> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|e| MailError::Permanent(format!("recipient {:?}: {e}", mail.to)))?;
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&mail.subject)
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(header::ContentType::TEXT_PLAIN)
                            .body(mail.text.clone()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(header::ContentType::TEXT_HTML)
                            .body(mail.html.clone()),
                    ),
            )
            .map_err(|e| MailError::Permanent(format!("message not built: {e}")))
    }
}

impl Mailer for SmtpMailer {
    async fn send(&self, mail: &Rendered) -> Result<(), MailError> {
        let message = self.message(mail)?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            // A refusal for good (5xx) is the message's fault; anything
            // else (no connection, a timeout, 4xx) is the server's moment.
            Err(e) if e.is_permanent() => Err(MailError::Permanent(e.to_string())),
            Err(e) => Err(MailError::Transient(e.to_string())),
        }
    }
}

/// Mail kept in memory, for tests: what was sent, and a switch to refuse.
#[derive(Default)]
pub struct FakeMailer {
    sent: Mutex<Vec<Rendered>>,
    /// While set, every send fails with this (transient or permanent).
    failing: Mutex<Option<bool>>,
}

impl FakeMailer {
    pub fn sent(&self) -> Vec<Rendered> {
        self.sent.lock().unwrap().clone()
    }

    /// `Some(true)`: sends fail for good; `Some(false)`: for now; `None`:
    /// they work.
    pub fn fail(&self, permanent: Option<bool>) {
        *self.failing.lock().unwrap() = permanent;
    }
}

impl Mailer for FakeMailer {
    async fn send(&self, mail: &Rendered) -> Result<(), MailError> {
        match *self.failing.lock().unwrap() {
            Some(true) => Err(MailError::Permanent("refused by the fake".into())),
            Some(false) => Err(MailError::Transient("the fake is down".into())),
            None => {
                self.sent.lock().unwrap().push(mail.clone());
                Ok(())
            }
        }
    }
}
