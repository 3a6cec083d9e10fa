-- Failed logins, for the per-account and per-address limits (an hour's
-- window; older rows are pruned as new ones arrive).
CREATE TABLE login_failures (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    email   text NOT NULL,
    address text
);
CREATE INDEX login_failures_email ON login_failures (email, at);
CREATE INDEX login_failures_address ON login_failures (address, at);

-- One instance per account, not counting one being released: a customer who
-- deletes may start again at once while the old one's data waits out the
-- grace period (it keeps its subdomain meanwhile).
DROP INDEX instances_one_per_user;
CREATE UNIQUE INDEX instances_one_per_user ON instances (user_id)
    WHERE status NOT IN ('deleted', 'failed', 'deleting');
