-- A draining node being emptied: its tenants migrate off, a few at a time.
ALTER TABLE nodes ADD COLUMN evacuating boolean NOT NULL DEFAULT false;
