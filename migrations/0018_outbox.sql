-- Mail to send, written in the same transaction as the event that causes
-- it (scheduler/src/outbox.rs). `dedupe_key` names the cause (e.g.
-- `gateway_live:<instance id>`), so a cause mails once however often it
-- is recorded. A sender leases a due row by moving `next_attempt_at`.
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    purpose         text NOT NULL,
    recipient       text NOT NULL,
    dedupe_key      text NOT NULL UNIQUE,
    params          jsonb NOT NULL DEFAULT '{}',
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
