//! Money as integer micro-dollars, never floats: what a number of tokens
//! costs at a price per million tokens, and a markup in whole percent. Each
//! step rounds up to the next micro-dollar, so a charge is never below its
//! cost; `u128` in between, so no product overflows.

use serde::{Deserialize, Serialize};

/// An amount in micro-dollars (1 = $0.000001).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Micros(pub u64);

impl Micros {
    pub const ZERO: Micros = Micros(0);

    pub fn saturating_add(self, other: Micros) -> Micros {
        Micros(self.0.saturating_add(other.0))
    }

    /// This amount with `percent` on top (20: ×1.2), rounded up.
    pub fn with_markup(self, percent: u32) -> Micros {
        let total = u128::from(self.0) * (100 + u128::from(percent));
        Micros(saturate(total.div_ceil(100)))
    }
}

impl std::fmt::Display for Micros {
    /// As dollars with six decimals: `$0.000150`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// What `tokens` cost at `per_million` micro-dollars per million tokens,
/// rounded up.
pub fn cost(tokens: u64, per_million: u64) -> Micros {
    let total = u128::from(tokens) * u128::from(per_million);
    Micros(saturate(total.div_ceil(1_000_000)))
}

/// An amount or a count for a `bigint` column (saturating, never wrapping).
pub fn db_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn saturate(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_round_up_to_the_next_micro_dollar() {
        // $0.15 per million tokens: one token costs 0.15 µ$, so 1 µ$.
        assert_eq!(cost(1, 150_000), Micros(1));
        assert_eq!(cost(1_000_000, 150_000), Micros(150_000));
        assert_eq!(cost(1_000_001, 150_000), Micros(150_001));
        assert_eq!(cost(0, 150_000), Micros::ZERO);
        assert_eq!(cost(u64::MAX, u64::MAX), Micros(u64::MAX), "saturates");
    }

    #[test]
    fn a_markup_is_whole_percent_rounded_up() {
        assert_eq!(Micros(100).with_markup(20), Micros(120));
        assert_eq!(Micros(1).with_markup(20), Micros(2));
        assert_eq!(Micros(5).with_markup(0), Micros(5));
        assert_eq!(Micros(u64::MAX).with_markup(20), Micros(u64::MAX));
    }

    #[test]
    fn amounts_print_as_dollars() {
        assert_eq!(Micros(150).to_string(), "$0.000150");
        assert_eq!(Micros(12_345_678).to_string(), "$12.345678");
    }
}
