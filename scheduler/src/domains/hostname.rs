//! What a customer's own hostname may be: normalized (lower case, IDNA to
//! punycode, no trailing dot) and refused when it is ours (the base domain
//! or under it), an IP literal, a wildcard, a single label, or not a host
//! name at all.

use crate::error::{Error, Result};

fn refuse(message: &str) -> Error {
    Error::Invalid {
        field: "hostname",
        message: message.into(),
    }
}

/// The hostname as it is stored and matched, or why it is refused.
pub fn normalize(raw: &str, base_domain: &str) -> Result<String> {
    let trimmed = raw.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(refuse("a hostname is required"));
    }
    if trimmed.contains('*') {
        return Err(refuse("wildcards are not accepted; add each name"));
    }
    if trimmed.parse::<std::net::IpAddr>().is_ok()
        || trimmed
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
    {
        return Err(refuse("an IP address is not a hostname"));
    }
    let ascii = idna::domain_to_ascii_strict(trimmed)
        .map_err(|_| refuse("not a valid hostname"))?
        .to_ascii_lowercase();
    if ascii.len() > 253 {
        return Err(refuse("at most 253 characters"));
    }
    let labels: Vec<&str> = ascii.split('.').collect();
    if labels.len() < 2 {
        return Err(refuse("a single label is not a public hostname"));
    }
    let valid_label = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !labels.iter().all(valid_label) {
        return Err(refuse("not a valid hostname"));
    }
    // All-numeric top-level labels are what IPv4 literals look like.
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(refuse("an IP address is not a hostname"));
    }
    let base = base_domain.trim_end_matches('.').to_ascii_lowercase();
    if ascii == base || ascii.ends_with(&format!(".{base}")) {
        return Err(refuse("names under our own domain are given by signup"));
    }
    Ok(ascii)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    const BASE: &str = "clawdeploy.com";

    #[test]
    fn hostnames_are_normalized() {
        for (raw, want) in [
            ("Chat.Example.ORG", "chat.example.org"),
            ("chat.example.org.", "chat.example.org"),
            ("  chat.example.org ", "chat.example.org"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
            ("a-b.c-d.example.co.uk", "a-b.c-d.example.co.uk"),
        ] {
            assert_eq!(normalize(raw, BASE).unwrap(), want, "{raw}");
        }
    }

    #[test]
    fn ours_literals_wildcards_and_single_labels_are_refused() {
        for raw in [
            "",
            ".",
            "clawdeploy.com",
            "alice.clawdeploy.com",
            "ALICE.ClawDeploy.com.",
            "*.example.org",
            "localhost",
            "10.0.0.1",
            "::1",
            "[2001:db8::1]",
            "1.2.3.999",
            "exa mple.org",
            "-bad.example.org",
            "bad-.example.org",
            "under_score.example.org",
            "a..b.example",
            &format!("{}.example.org", "a".repeat(64)),
            &format!("{}.org", "a.".repeat(130)),
        ] {
            assert!(normalize(raw, BASE).is_err(), "{raw:?} was accepted");
        }
        // A name that merely ends like ours is not ours.
        assert!(normalize("notclawdeploy.com", BASE).is_ok());
    }
}
