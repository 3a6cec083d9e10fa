//! Value parsers for flags given in whole seconds (`--…-secs`), read
//! straight into a `Duration` by clap.

use std::time::Duration;

/// Whole seconds.
pub fn secs(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))
}

/// Whole seconds, 0 read as 1: for a timeout, lifetime or period that
/// would spin or expire at once at zero.
pub fn nonzero_secs(s: &str) -> Result<Duration, String> {
    Ok(secs(s)?.max(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_parse_and_zero_is_one_where_it_must_be() {
        assert_eq!(secs(" 90 "), Ok(Duration::from_secs(90)));
        assert_eq!(secs("0"), Ok(Duration::ZERO));
        assert_eq!(nonzero_secs("0"), Ok(Duration::from_secs(1)));
        assert!(secs("1.5").is_err());
        assert!(secs("-1").unwrap_err().contains("not a number of seconds"));
    }
}
