//! What a credits request may cost: its worst case (every input token
//! uncached, its output at the cap), the least a request may be held for,
//! and how many output tokens a smaller hold affords. The input is
//! estimated from the request's size in bytes: no tokenizer counts more
//! tokens than bytes, so the estimate is an upper bound.

use crate::money::Micros;
use crate::prices::{Price, Usage};

/// The charge for `usage` at `price` with `markup` percent on top.
pub fn charge(price: &Price, markup: u32, usage: Usage) -> Micros {
    price.cost_of(usage).with_markup(markup)
}

/// The hold for a request of `input` tokens (at most) asking for
/// `max_output` tokens (the model's cap when it does not say).
pub fn worst_case(price: &Price, markup: u32, input: u64, max_output: Option<u64>) -> Micros {
    price.worst_case(input, max_output).with_markup(markup)
}

/// The most output tokens (up to the model's cap) whose charge, with
/// `input` tokens, fits in `budget`; 0 when not even the input fits.
pub fn affordable_output(price: &Price, markup: u32, input: u64, budget: Micros) -> u64 {
    let fits = |output: u64| {
        charge(
            price,
            markup,
            Usage {
                input,
                cached_input: 0,
                output,
            },
        ) <= budget
    };
    if !fits(0) {
        return 0;
    }
    let (mut lo, mut hi) = (0u64, price.max_output_tokens);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price() -> Price {
        Price {
            input_per_million: 2_500_000,
            cached_input_per_million: 1_250_000,
            output_per_million: 10_000_000,
            max_output_tokens: 16_384,
        }
    }

    #[test]
    fn the_affordable_output_is_the_largest_that_fits() {
        let p = price();
        for budget in [0u64, 1, 50, 1_000, 12_345, 200_000, 10_000_000] {
            let budget = Micros(budget);
            let o = affordable_output(&p, 20, 100, budget);
            let cost = |o| {
                charge(
                    &p,
                    20,
                    Usage {
                        input: 100,
                        cached_input: 0,
                        output: o,
                    },
                )
            };
            if o > 0 || cost(0) <= budget {
                assert!(cost(o) <= budget, "{budget:?}: {o}");
            }
            if o < p.max_output_tokens && cost(0) <= budget {
                assert!(cost(o + 1) > budget, "{budget:?}: {o} is not the most");
            }
        }
        assert_eq!(affordable_output(&p, 20, 100, Micros(u64::MAX)), 16_384);
    }

    #[test]
    fn the_worst_case_covers_any_usage_within_it() {
        let p = price();
        let hold = worst_case(&p, 20, 500, Some(100));
        for (input, cached, output) in [(500, 0, 100), (10, 5, 100), (500, 500, 0)] {
            assert!(
                charge(
                    &p,
                    20,
                    Usage {
                        input,
                        cached_input: cached,
                        output
                    }
                ) <= hold
            );
        }
    }
}
