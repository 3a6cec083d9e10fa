-- Model access through the metering proxy (llm-proxy/): AI credits, the
-- slices of them leased to proxies, usage events and their monthly rollup,
-- and the free tier's message count. Money is integer micro-dollars.

-- An account's AI credits that no proxy holds.
CREATE TABLE credit_balances (
    user_id              uuid PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    balance_micros       bigint NOT NULL DEFAULT 0 CHECK (balance_micros >= 0),
    -- The last purchase's amount: the 90 % warning is of this.
    last_purchase_micros bigint NOT NULL DEFAULT 0 CHECK (last_purchase_micros >= 0),
    -- When the 90 % warning went out for the last purchase (once each).
    low_warned_at        timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Credits a proxy took out of a balance (one conditional UPDATE) to hold
-- requests against in memory. `spent_micros` grows with each flushed usage
-- event; what is left goes back to the balance when the proxy returns the
-- lease (shutdown, idle) or, after a crash, when it expires.
CREATE TABLE credit_leases (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    proxy_id      text NOT NULL,
    amount_micros bigint NOT NULL CHECK (amount_micros > 0),
    spent_micros  bigint NOT NULL DEFAULT 0 CHECK (spent_micros >= 0 AND spent_micros <= amount_micros),
    taken_at      timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX credit_leases_user ON credit_leases (user_id);
CREATE INDEX credit_leases_expiry ON credit_leases (expires_at);

-- One completed (or abandoned) model request. The id is the proxy's, so a
-- flush retried after a crash or a lost commit inserts nothing twice.
CREATE TABLE llm_usage_events (
    id                  uuid PRIMARY KEY,
    instance_id         uuid NOT NULL,
    user_id             uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    model               text NOT NULL,
    pay_mode            text NOT NULL CHECK (pay_mode IN ('byok', 'credits')),
    input_tokens        bigint NOT NULL CHECK (input_tokens >= 0),
    cached_input_tokens bigint NOT NULL CHECK (cached_input_tokens >= 0),
    output_tokens       bigint NOT NULL CHECK (output_tokens >= 0),
    -- What the account was charged (0 when it brought its own key).
    charged_micros      bigint NOT NULL CHECK (charged_micros >= 0),
    -- The upstream never told the usage: the hold's estimate was charged.
    estimated           boolean NOT NULL,
    lease_id            uuid,
    at                  timestamptz NOT NULL
);
CREATE INDEX llm_usage_events_instance ON llm_usage_events (instance_id, at);

-- The month's usage per instance, model and way of paying (UTC months).
CREATE TABLE llm_usage_monthly (
    instance_id         uuid NOT NULL,
    month               date NOT NULL,
    model               text NOT NULL,
    pay_mode            text NOT NULL CHECK (pay_mode IN ('byok', 'credits')),
    user_id             uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    messages            bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    charged_micros      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (instance_id, month, model, pay_mode)
);

-- The free tier's messages this month, counted before a request goes
-- upstream (one conditional upsert), so the limit holds across proxies.
CREATE TABLE message_quota (
    instance_id uuid NOT NULL,
    month       date NOT NULL,
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    used        integer NOT NULL CHECK (used >= 0),
    PRIMARY KEY (instance_id, month)
);

-- The metering proxy caches what it learned of a caller (its token's
-- instance, its keys) for a while; a change to an instance's keys, status
-- or container tells it at once (LISTEN clawdeploy_tenants), whichever
-- code path made it.
CREATE FUNCTION notify_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('clawdeploy_tenants',
                      (CASE WHEN TG_OP = 'DELETE' THEN OLD.instance_id ELSE NEW.instance_id END)::text);
    RETURN NULL;
END $$;

CREATE FUNCTION notify_instance_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status OR NEW.container_id IS DISTINCT FROM OLD.container_id THEN
        PERFORM pg_notify('clawdeploy_tenants', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER secrets_tell_proxies AFTER INSERT OR UPDATE OR DELETE ON secrets
    FOR EACH ROW EXECUTE FUNCTION notify_tenant_changed();
CREATE TRIGGER instances_tell_proxies AFTER UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION notify_instance_changed();
