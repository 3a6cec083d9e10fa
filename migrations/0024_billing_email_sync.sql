-- An account that moved to a new address whose Stripe customer still has
-- the old one (scheduler/src/billing/sync.rs tells Stripe, then clears it).
ALTER TABLE users ADD COLUMN billing_email_stale boolean NOT NULL DEFAULT false;
CREATE INDEX users_billing_email_stale ON users (id) WHERE billing_email_stale;
