-- Sessions a customer can see and end (scheduler/src/accounts/sessions.rs):
-- an id to name one by, when it was last used (to the minute), and where
-- it was opened from.
ALTER TABLE sessions ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE sessions ADD CONSTRAINT sessions_id_key UNIQUE (id);
ALTER TABLE sessions ADD COLUMN last_used_at timestamptz;
ALTER TABLE sessions ADD COLUMN address text;
ALTER TABLE sessions ADD COLUMN user_agent text NOT NULL DEFAULT '';

-- The account's security log (accounts/security_log.rs): what happened to
-- its sign-in, from where. Never a password, token or code. Kept a year.
CREATE TABLE security_events (
    id         bigserial PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL DEFAULT now(),
    kind       text NOT NULL,
    address    text,
    user_agent text NOT NULL DEFAULT '',
    detail     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX security_events_user ON security_events (user_id, id DESC);
CREATE INDEX security_events_at ON security_events (at);

-- TOTP (accounts/mfa.rs): the secret sealed under the KEK; set but not
-- enabled while the customer has not yet confirmed a code. The last
-- accepted time step, so no code is accepted twice.
ALTER TABLE users ADD COLUMN totp_secret_enc bytea;
ALTER TABLE users ADD COLUMN totp_enabled_at timestamptz;
ALTER TABLE users ADD COLUMN totp_last_step bigint;

-- Ten single-use recovery codes per account, as their SHA-256 (each holds
-- 50 random bits); a new set replaces the old.
CREATE TABLE recovery_codes (
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash bytea NOT NULL,
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- The second step of a login with MFA on: a token valid five minutes and
-- five tries, kept as its SHA-256, with where the login came from.
CREATE TABLE mfa_challenges (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    attempts   integer NOT NULL DEFAULT 0,
    address    text,
    user_agent text NOT NULL DEFAULT ''
);
CREATE INDEX mfa_challenges_user ON mfa_challenges (user_id);

-- Profile (accounts/profile.rs): the customer's IANA time zone.
ALTER TABLE users ADD COLUMN timezone text NOT NULL DEFAULT 'UTC';

-- A change of email is proven by a link to the new address, as a
-- registration's is: `new_email` names the address the account moves to.
ALTER TABLE email_verifications ADD COLUMN new_email boolean NOT NULL DEFAULT false;
