//! The product's mails, each as plain text and HTML from one template.
//! Links come in whole (the outbox builds them from `--public-origin` and
//! the base domain, never from a request's `Host`); everything put into
//! the HTML is escaped.

use serde::{Deserialize, Serialize};

use super::Rendered;

/// What a mail is for: the outbox's `purpose` column, and the `purpose`
/// label of the mail metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// The first time a customer's gateway is ready.
    GatewayLive,
    /// A link that proves the account's email address.
    VerifyEmail,
    /// A link that sets a new password.
    PasswordReset,
    /// The notice that the password changed.
    PasswordChanged,
    /// The notice that two-factor sign-in was turned on.
    MfaEnabled,
    /// The notice that two-factor sign-in was turned off.
    MfaDisabled,
    /// A link, to a new address, that moves the account to it.
    ConfirmEmailChange,
    /// The notice, to the current address, that a move was asked for.
    EmailChangeNotice,
    /// An account's deletion was asked for: what happens, and the link
    /// that undoes it.
    DeletionRequested,
    /// An account's deletion was undone.
    DeletionUndone,
    /// A payment failed: the account is `past_due` while Stripe retries.
    PaymentFailed,
    /// A grace period ends in three days, and the plan with it.
    GraceEnding,
    /// 90 % of the month's free messages are used.
    MessagesNearLimit,
    /// 90 % of the last credits bought are spent.
    CreditsLow,
}

impl Purpose {
    pub const ALL: [Purpose; 14] = [
        Purpose::GatewayLive,
        Purpose::VerifyEmail,
        Purpose::PasswordReset,
        Purpose::PasswordChanged,
        Purpose::MfaEnabled,
        Purpose::MfaDisabled,
        Purpose::ConfirmEmailChange,
        Purpose::EmailChangeNotice,
        Purpose::DeletionRequested,
        Purpose::DeletionUndone,
        Purpose::PaymentFailed,
        Purpose::GraceEnding,
        Purpose::MessagesNearLimit,
        Purpose::CreditsLow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::GatewayLive => "gateway_live",
            Purpose::VerifyEmail => "verify_email",
            Purpose::PasswordReset => "password_reset",
            Purpose::PasswordChanged => "password_changed",
            Purpose::MfaEnabled => "mfa_enabled",
            Purpose::MfaDisabled => "mfa_disabled",
            Purpose::ConfirmEmailChange => "confirm_email_change",
            Purpose::EmailChangeNotice => "email_change_notice",
            Purpose::DeletionRequested => "deletion_requested",
            Purpose::DeletionUndone => "deletion_undone",
            Purpose::PaymentFailed => "payment_failed",
            Purpose::GraceEnding => "grace_ending",
            Purpose::MessagesNearLimit => "messages_near_limit",
            Purpose::CreditsLow => "credits_low",
        }
    }
}

/// A mail with what its template needs.
pub enum Mail<'a> {
    GatewayLive {
        /// The gateway's URL.
        url: &'a str,
        /// Where the customer manages it.
        dashboard: &'a str,
    },
    VerifyEmail {
        /// The link that confirms the address (its token inside).
        link: &'a str,
        /// How long it works, in hours.
        valid_hours: u32,
    },
    PasswordReset {
        /// The link that sets a new password (its token inside).
        link: &'a str,
        valid_minutes: u32,
    },
    PasswordChanged {
        /// Where to sign in (and reset again if this was not the owner).
        dashboard: &'a str,
    },
    /// Two-factor sign-in turned on (`true`) or off.
    MfaChanged {
        on: bool,
        dashboard: &'a str,
    },
    /// To the new address: the link that moves the account to it.
    ConfirmEmailChange {
        link: &'a str,
        valid_hours: u32,
    },
    /// To the current address: a move to `new_email` was asked for.
    EmailChangeNotice {
        new_email: &'a str,
        dashboard: &'a str,
    },
    /// The account will be erased in `grace_days` unless `link` is used
    /// (or the owner signs in).
    DeletionRequested {
        link: &'a str,
        grace_days: u32,
    },
    DeletionUndone {
        dashboard: &'a str,
    },
    PaymentFailed {
        dashboard: &'a str,
    },
    /// The grace ends at `ends` (UTC); the account then moves from `tier`
    /// to the free plan.
    GraceEnding {
        ends: &'a str,
        tier: &'a str,
        dashboard: &'a str,
    },
    /// `used` of the month's `limit` free messages are used.
    MessagesNearLimit {
        used: &'a str,
        limit: &'a str,
        dashboard: &'a str,
    },
    /// Of the last `bought` (dollars), `left` remain.
    CreditsLow {
        left: &'a str,
        bought: &'a str,
        dashboard: &'a str,
    },
}

/// The mail to `to`, rendered.
pub fn render(to: &str, mail: &Mail<'_>) -> Rendered {
    let (subject, paragraphs, link) = match mail {
        Mail::GatewayLive { url, dashboard } => (
            "Your OpenClaw gateway is live".to_owned(),
            vec![
                format!("Your OpenClaw gateway is live at {url}"),
                "Connect your apps to it with the gateway token shown in your dashboard.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::VerifyEmail { link, valid_hours } => (
            "Confirm your email address".to_owned(),
            vec![
                "Confirm that this address is yours to keep your OpenClaw gateway running and to unlock billing and custom domains.".into(),
                format!("The link works once, for {valid_hours} hours. If you did not sign up for ClawDeploy, ignore this mail."),
            ],
            Some(("Confirm your email address", *link)),
        ),
        Mail::PasswordReset { link, valid_minutes } => (
            "Reset your ClawDeploy password".to_owned(),
            vec![
                "Someone asked to reset the password of your ClawDeploy account. If it was you, choose a new one with the link below.".into(),
                format!("The link works once, for {valid_minutes} minutes. If you did not ask, ignore this mail: your password stays as it is."),
            ],
            Some(("Choose a new password", *link)),
        ),
        Mail::PasswordChanged { dashboard } => (
            "Your ClawDeploy password was changed".to_owned(),
            vec![
                "The password of your ClawDeploy account was just changed, and every session was signed out.".into(),
                "If this was not you, reset your password at once from the sign-in page, and tell us.".into(),
            ],
            Some(("Sign in", *dashboard)),
        ),
        Mail::MfaChanged { on: true, dashboard } => (
            "Two-factor sign-in is on".to_owned(),
            vec![
                "Two-factor sign-in was turned on for your ClawDeploy account: signing in now asks for a code from your authenticator app.".into(),
                "Keep your recovery codes somewhere safe. If this was not you, reset your password at once and tell us.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::MfaChanged { on: false, dashboard } => (
            "Two-factor sign-in is off".to_owned(),
            vec![
                "Two-factor sign-in was turned off for your ClawDeploy account: signing in now asks for the password alone.".into(),
                "If this was not you, reset your password at once, turn two-factor sign-in on again, and tell us.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::ConfirmEmailChange { link, valid_hours } => (
            "Confirm your new email address".to_owned(),
            vec![
                "Your ClawDeploy account asked to use this address from now on. Confirm it with the link below; until then the account keeps its current address.".into(),
                format!("The link works once, for {valid_hours} hours. If you did not ask for this, ignore this mail."),
            ],
            Some(("Confirm this address", *link)),
        ),
        Mail::EmailChangeNotice { new_email, dashboard } => (
            "Your ClawDeploy email address is about to change".to_owned(),
            vec![
                format!("Someone signed in to your ClawDeploy account asked to move it to {new_email}. The move happens only when that address confirms it."),
                "If this was not you, sign in, change your password and end the other sessions at once; the link to the new address stops working when the password changes.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::DeletionRequested { link, grace_days } => (
            "Your ClawDeploy account will be deleted".to_owned(),
            vec![
                format!("You asked to delete your ClawDeploy account. Every session was signed out and your gateway is paused, with its data kept. In {grace_days} days the gateway, its data, its custom domains and your personal data are deleted, and your subscription ends."),
                "Changed your mind? Use the link below, or simply sign in again, before then: everything comes back as it was.".into(),
            ],
            Some(("Keep my account", *link)),
        ),
        Mail::DeletionUndone { dashboard } => (
            "Your ClawDeploy account is no longer being deleted".to_owned(),
            vec![
                "The deletion of your ClawDeploy account was undone: your gateway is running again, with its data, and your subscription continues.".into(),
                "If this was not you, reset your password at once and tell us.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::PaymentFailed { dashboard } => (
            "Your ClawDeploy payment failed".to_owned(),
            vec![
                "The latest payment for your ClawDeploy plan did not go through. Your gateway keeps its plan while the payment is retried over the next days.".into(),
                "Update your card in the billing portal (from your dashboard) to keep it.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::MessagesNearLimit {
            used,
            limit,
            dashboard,
        } => (
            "You have used 90 % of this month's free messages".to_owned(),
            vec![
                format!("Your gateway has sent {used} of its {limit} free model messages this month. When they are used, models answer again on the first of next month."),
                "Upgrade your plan, or add your own provider key, to keep going.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::CreditsLow {
            left,
            bought,
            dashboard,
        } => (
            "Your AI credits are running low".to_owned(),
            vec![
                format!("{left} remain of the {bought} of AI credits you bought last. When they run out, models paid with credits stop answering."),
                "Buy more, or top up with your saved card, from your dashboard.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
        Mail::GraceEnding { ends, tier, dashboard } => (
            "Your ClawDeploy plan ends in 3 days".to_owned(),
            vec![
                format!("Your {tier} plan could not be paid, and its grace period ends at {ends} (UTC). Your gateway then moves to the free plan, with its data kept."),
                "Update your card in the billing portal (from your dashboard) to keep your plan.".into(),
            ],
            Some(("Open your dashboard", *dashboard)),
        ),
    };
    let mut text = paragraphs.join("\n\n");
    let mut html = paragraphs
        .iter()
        .map(|p| format!("<p>{}</p>", escape(p)))
        .collect::<Vec<_>>()
        .join("\n");
    if let Some((label, href)) = link {
        text.push_str(&format!("\n\n{label}: {href}\n"));
        html.push_str(&format!(
            "\n<p><a href=\"{}\">{}</a></p>",
            escape(href),
            escape(label)
        ));
    }
    text.push_str("\n-- \nClawDeploy\n");
    Rendered {
        to: to.to_owned(),
        subject,
        text,
        html: format!(
            "<!doctype html>\n<html><body style=\"font-family: sans-serif\">\n{html}\n<p>ClawDeploy</p>\n</body></html>\n"
        ),
    }
}

/// Text made safe inside HTML (elements and attributes).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_live_mail_links_its_gateway_in_text_and_escaped_html() {
        let r = render(
            "ada@example.com",
            &Mail::GatewayLive {
                url: "https://ada.clawdeploy.localhost",
                dashboard: "https://app.example.com/?a=1&b=\"2\"",
            },
        );
        assert_eq!(r.to, "ada@example.com");
        assert_eq!(r.subject, "Your OpenClaw gateway is live");
        assert!(r.text.contains("live at https://ada.clawdeploy.localhost"));
        assert!(r
            .text
            .contains("Open your dashboard: https://app.example.com/?a=1&b=\"2\""));
        assert!(r
            .html
            .contains("<a href=\"https://app.example.com/?a=1&amp;b=&quot;2&quot;\">"));
        assert!(!r.html.contains("b=\"2\""));
    }

    #[test]
    fn a_verification_mail_carries_its_link_and_how_long_it_works() {
        let r = render(
            "bo@example.com",
            &Mail::VerifyEmail {
                link: "https://app.example.com/#verify-email=abc",
                valid_hours: 24,
            },
        );
        assert_eq!(r.subject, "Confirm your email address");
        assert!(r.text.contains("https://app.example.com/#verify-email=abc"));
        assert!(r.text.contains("for 24 hours"));
        assert!(r
            .html
            .contains("href=\"https://app.example.com/#verify-email=abc\""));
    }

    #[test]
    fn every_purpose_is_spelled_as_stored() {
        for p in Purpose::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }
}
