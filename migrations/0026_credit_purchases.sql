-- AI credits bought through Stripe: one row per PaymentIntent, so a
-- purchase is applied once whichever of its webhooks comes first
-- (`checkout.session.completed`, `payment_intent.succeeded`) and however
-- often each is delivered; a refund or dispute takes back what it names.
CREATE TABLE credit_purchases (
    payment_intent_id  text PRIMARY KEY,
    user_id            uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    amount_micros      bigint NOT NULL CHECK (amount_micros > 0),
    kind               text NOT NULL CHECK (kind IN ('checkout', 'top_up')),
    -- Refunded or disputed so far (the larger of the two).
    clawed_back_micros bigint NOT NULL DEFAULT 0 CHECK (clawed_back_micros >= 0),
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_purchases_user ON credit_purchases (user_id, created_at);

-- The card a credits purchase saved for top-ups charged off-session.
ALTER TABLE billing_accounts ADD COLUMN credits_payment_method text;
