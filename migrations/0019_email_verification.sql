-- Email verification (scheduler/src/accounts/verify.rs). A link's token is
-- stored only as its SHA-256; the mail that carries it holds the token
-- sealed under the KEK (`outbox.secret_enc`) until it is sent, then
-- nothing.
ALTER TABLE users ADD COLUMN email_verified_at timestamptz;
-- Accounts made before verification existed keep working as they did.
UPDATE users SET email_verified_at = created_at;

CREATE TABLE email_verifications (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- The address the link proves (an account's email may change later).
    email      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX email_verifications_user ON email_verifications (user_id, created_at);

ALTER TABLE outbox ADD COLUMN secret_enc bytea;
