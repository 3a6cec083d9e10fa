-- Customers' own hostnames: one owner at a time (the primary key); the TXT
-- token proves ownership, the certificate comes from ACME.
CREATE TABLE domains (
    hostname        text PRIMARY KEY,
    instance_id     uuid NOT NULL REFERENCES instances (id),
    user_id         uuid NOT NULL REFERENCES users (id),
    state           text NOT NULL DEFAULT 'pending_dns'
                    CHECK (state IN ('pending_dns', 'verified', 'issuing', 'active', 'renewing', 'failed', 'off')),
    -- The value of `_clawdeploy-challenge.<hostname>` TXT.
    token           text NOT NULL,
    -- Why it is failed or off, for the customer.
    reason          text NOT NULL DEFAULT '',
    cert_not_after  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domains_instance ON domains (instance_id);
