-- The product spec's register body carries a display name (optional); it
-- becomes the Stripe customer's name.
ALTER TABLE users ADD COLUMN name text NOT NULL DEFAULT '';
