-- Certificates for customers' domains: the ACME account, orders (for the
-- rate caps and the record), and each domain's certificate, its sealed key
-- and the HTTP-01 answer the edges serve while an order is open.

-- A name may be claimed by several accounts while unproven; it has one
-- owner once proven (the TXT check moves it).
ALTER TABLE domains DROP CONSTRAINT domains_pkey;
ALTER TABLE domains ADD PRIMARY KEY (hostname, instance_id);
CREATE UNIQUE INDEX domains_owner ON domains (hostname) WHERE state <> 'pending_dns';

ALTER TABLE domains
    ADD COLUMN cert_pem           text,
    -- The certificate's private key, sealed under the KEK.
    ADD COLUMN key_sealed         bytea,
    ADD COLUMN cert_not_before    timestamptz,
    ADD COLUMN renew_at           timestamptz,
    -- The open order's HTTP-01 challenge, served by every edge.
    ADD COLUMN challenge_token    text,
    ADD COLUMN challenge_key_auth text,
    -- Failed orders in a row, and when the next one may start.
    ADD COLUMN attempts           integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    -- A scheduler working an order holds the domain until then.
    ADD COLUMN lease_until        timestamptz,
    ADD COLUMN checked_at         timestamptz NOT NULL DEFAULT now(),
    -- Why a domain is off: the plan (restored by an upgrade) or its records.
    ADD COLUMN off_cause          text CHECK (off_cause IN ('plan', 'dns'));

CREATE TABLE acme_accounts (
    directory_url      text PRIMARY KEY,
    -- instant-acme's account credentials (JSON), sealed under the KEK.
    credentials_sealed bytea NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE acme_orders (
    id          bigserial PRIMARY KEY,
    hostname    text NOT NULL,
    renewal     boolean NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    result      text CHECK (result IN ('issued', 'failed')),
    error       text NOT NULL DEFAULT ''
);
CREATE INDEX acme_orders_started ON acme_orders (started_at);
CREATE INDEX acme_orders_hostname ON acme_orders (hostname, started_at);

-- A custom domain's route: it may carry only an ACME challenge (no
-- container yet); `custom` tells it from the instance's own subdomain.
ALTER TABLE routes ALTER COLUMN container_id DROP NOT NULL;
ALTER TABLE routes ADD COLUMN custom boolean NOT NULL DEFAULT false;
-- What the edge got for a custom route (certificate, challenge), so a sync
-- that changes nothing sends nothing.
ALTER TABLE routes ADD COLUMN tls_fingerprint text NOT NULL DEFAULT '';
