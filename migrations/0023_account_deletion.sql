-- Deletion with a 30-day grace (scheduler/src/accounts/deletion.rs): when
-- it was asked for; the subscription's cancel-at-period-end still to be
-- told to Stripe (true on deletion, false on undo, NULL once told); when
-- the account's personal data was erased.
ALTER TABLE users ADD COLUMN deletion_requested_at timestamptz;
ALTER TABLE users ADD COLUMN billing_cancel_wanted boolean;
ALTER TABLE users ADD COLUMN purged_at timestamptz;
CREATE INDEX users_deletion ON users (deletion_requested_at)
    WHERE deletion_requested_at IS NOT NULL AND purged_at IS NULL;
CREATE INDEX users_billing_cancel ON users (id) WHERE billing_cancel_wanted IS NOT NULL;

-- The mailed link that undoes a deletion, kept as its SHA-256.
CREATE TABLE deletion_undo_links (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
