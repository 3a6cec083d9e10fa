-- Billing state per account, as Stripe's webhooks report it, and the
-- events already applied (each is applied once, in the same transaction as
-- its effect).
CREATE TABLE billing_accounts (
    user_id            uuid PRIMARY KEY REFERENCES users (id),
    customer_id        text UNIQUE,
    subscription_id    text UNIQUE,
    tier               text NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'pro', 'team')),
    status             text NOT NULL DEFAULT 'none'
                       CHECK (status IN ('none', 'active', 'past_due', 'grace', 'canceled')),
    current_period_end timestamptz,
    grace_until        timestamptz,
    -- `created` of the newest subscription event applied: older ones are
    -- acknowledged and not applied.
    state_at           timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_accounts_grace ON billing_accounts (grace_until) WHERE status = 'grace';

CREATE TABLE stripe_events (
    id          text PRIMARY KEY,
    type        text NOT NULL,
    created     timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    -- What applying it did: linked, applied, stale, unknown_account, ignored, …
    outcome     text NOT NULL
);
