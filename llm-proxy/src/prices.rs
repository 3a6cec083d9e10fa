//! The pinned price table (`prices.json`, compiled in): for each model we
//! sell, its price per million input, cached-input and output tokens in
//! micro-dollars, and its output cap. Prices drift, so they change only by
//! a reviewed commit, never by a fetch at run time.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::money::{cost, Micros};

const PINNED: &str = include_str!("../prices.json");

/// One model's prices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    pub input_per_million: u64,
    pub cached_input_per_million: u64,
    pub output_per_million: u64,
    pub max_output_tokens: u64,
}

/// The usage of one request, as the upstream reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens, cached ones included.
    pub input: u64,
    /// Of `input`, those the upstream served from its cache.
    pub cached_input: u64,
    pub output: u64,
}

impl Price {
    /// What `usage` costs at this price (before any markup).
    pub fn cost_of(&self, usage: Usage) -> Micros {
        let cached = usage.cached_input.min(usage.input);
        cost(usage.input - cached, self.input_per_million)
            .saturating_add(cost(cached, self.cached_input_per_million))
            .saturating_add(cost(usage.output, self.output_per_million))
    }

    /// The most a request of `input` tokens can cost: every input token
    /// uncached, and its output at the cap (or `max_output`, when the
    /// request asks for fewer).
    pub fn worst_case(&self, input: u64, max_output: Option<u64>) -> Micros {
        let output = max_output.map_or(self.max_output_tokens, |m| m.min(self.max_output_tokens));
        self.cost_of(Usage {
            input,
            cached_input: 0,
            output,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    pinned_on: String,
    unit: String,
    models: BTreeMap<String, Price>,
}

/// The table.
#[derive(Debug, Clone)]
pub struct Prices {
    pub pinned_on: String,
    models: BTreeMap<String, Price>,
}

/// Why a table was refused.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("the price table is not readable: {0}")]
    Unreadable(#[from] serde_json::Error),
    #[error("the price table's unit is {0:?}, not micro-dollars per million tokens")]
    Unit(String),
    #[error("model {0}: {1}")]
    Model(String, &'static str),
}

impl Prices {
    /// The table pinned in this build.
    pub fn pinned() -> Result<Prices, PriceError> {
        Prices::parse(PINNED)
    }

    pub fn parse(text: &str) -> Result<Prices, PriceError> {
        let file: File = serde_json::from_str(text)?;
        if file.unit != "micro-dollars per million tokens" {
            return Err(PriceError::Unit(file.unit));
        }
        for (name, p) in &file.models {
            if p.input_per_million == 0 || p.output_per_million == 0 {
                return Err(PriceError::Model(name.clone(), "a price of zero"));
            }
            if p.cached_input_per_million > p.input_per_million {
                return Err(PriceError::Model(
                    name.clone(),
                    "cached input dearer than input",
                ));
            }
            if p.max_output_tokens == 0 {
                return Err(PriceError::Model(name.clone(), "no output allowed"));
            }
        }
        Ok(Prices {
            pinned_on: file.pinned_on,
            models: file.models,
        })
    }

    /// The price of `model`, if we sell it.
    pub fn of(&self, model: &str) -> Option<&Price> {
        self.models.get(model)
    }

    /// The models we sell, in order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_table_parses_and_prices_a_request() {
        let prices = Prices::pinned().unwrap();
        assert_eq!(
            prices.models().collect::<Vec<_>>(),
            ["openai/gpt-4o", "openai/gpt-4o-mini"]
        );
        let mini = prices.of("openai/gpt-4o-mini").unwrap();
        // 1,000 input tokens (400 cached) and 500 output tokens:
        // 600 × 0.15 + 400 × 0.075 + 500 × 0.6 = 90 + 30 + 300 µ$.
        let usage = Usage {
            input: 1_000,
            cached_input: 400,
            output: 500,
        };
        assert_eq!(mini.cost_of(usage), Micros(420));
        assert_eq!(mini.cost_of(usage).with_markup(20), Micros(504));
        assert!(prices.of("openai/gpt-5-ultra").is_none());
    }

    #[test]
    fn the_worst_case_holds_the_output_cap() {
        let prices = Prices::pinned().unwrap();
        let big = prices.of("openai/gpt-4o").unwrap();
        // 100 input tokens and 16,384 output at $2.50 and $10 a million.
        assert_eq!(big.worst_case(100, None), Micros(250 + 163_840));
        assert_eq!(big.worst_case(100, Some(10)), Micros(250 + 100));
        assert_eq!(
            big.worst_case(100, Some(1 << 40)),
            big.worst_case(100, None)
        );
    }

    #[test]
    fn a_table_with_a_wrong_unit_or_price_is_refused() {
        let wrong_unit = r#"{"pinnedOn": "x", "unit": "dollars", "models": {}}"#;
        assert!(matches!(
            Prices::parse(wrong_unit),
            Err(PriceError::Unit(_))
        ));
        let free = r#"{"pinnedOn": "x", "unit": "micro-dollars per million tokens", "models":
            {"m": {"inputPerMillion": 0, "cachedInputPerMillion": 0, "outputPerMillion": 1, "maxOutputTokens": 1}}}"#;
        assert!(matches!(Prices::parse(free), Err(PriceError::Model(..))));
        let float = r#"{"pinnedOn": "x", "unit": "micro-dollars per million tokens", "models":
            {"m": {"inputPerMillion": 0.5, "cachedInputPerMillion": 0, "outputPerMillion": 1, "maxOutputTokens": 1}}}"#;
        assert!(
            matches!(Prices::parse(float), Err(PriceError::Unreadable(_))),
            "no floats"
        );
    }
}
