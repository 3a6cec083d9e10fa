//! Billing: the product spec's plans (`plans`) and moving an instance to
//! another tier (`tier`), live: the container keeps running and is resized
//! in place. Stripe's side (Checkout, the portal, webhooks) will call into
//! these.

pub mod plans;
pub mod tier;
