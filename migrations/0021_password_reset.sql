-- Password reset (scheduler/src/accounts/reset.rs): a link's token is
-- stored only as its SHA-256, valid one hour, once; using it ends every
-- session of the account and every other reset token. Requests are
-- counted per email and per address for the rate limits.
CREATE TABLE password_resets (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX password_resets_user ON password_resets (user_id);

CREATE TABLE reset_requests (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    email   text NOT NULL,
    address text
);
CREATE INDEX reset_requests_email ON reset_requests (email, at);
CREATE INDEX reset_requests_address ON reset_requests (address, at);
