-- The instance a signup with an Idempotency-Key created, set in the claim's
-- own transaction: a retry whose first answer was lost (the database went
-- away after the claim committed) answers with that instance instead of
-- claiming again into `instance_exists`.
ALTER TABLE idempotency_keys
    ADD COLUMN instance_id uuid REFERENCES instances (id) ON DELETE SET NULL;

-- Registrations per client address (an hour's window), for the limit on
-- accounts one address may create; attempts refused as `email_taken` count
-- too, which bounds probing for registered emails.
CREATE TABLE registration_attempts (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    address text NOT NULL
);
CREATE INDEX registration_attempts_address ON registration_attempts (address, at);
