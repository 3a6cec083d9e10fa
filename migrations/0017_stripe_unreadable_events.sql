-- Stripe events whose signature is good but which billing could not read
-- (a field the event types of billing's Stripe API version require is
-- missing: the webhook endpoint sends another API version). Each is
-- acknowledged to Stripe, so it is neither retried for days nor counted
-- against the endpoint, and kept here, whole, for an operator; an alert
-- fires while any is unresolved (docs/operations.md, "Billing").
CREATE TABLE stripe_unreadable_events (
    -- The event's id, or `sha256:<hex of the payload>` when it has none.
    id          text PRIMARY KEY,
    type        text NOT NULL DEFAULT '',
    api_version text NOT NULL DEFAULT '',
    payload     text NOT NULL,
    error       text NOT NULL,
    deliveries  integer NOT NULL DEFAULT 1,
    received_at timestamptz NOT NULL DEFAULT now(),
    -- Set by an operator once the event is applied by hand or judged moot.
    resolved_at timestamptz
);
CREATE INDEX stripe_unreadable_events_open ON stripe_unreadable_events (received_at)
    WHERE resolved_at IS NULL;
