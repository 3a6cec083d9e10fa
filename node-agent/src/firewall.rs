//! Tenant isolation on the host's firewall. Every tenant network's bridge is
//! named `cdt<hash>`, so one set of wildcard rules covers all of them, for
//! every agent on the host:
//!
//! - `DOCKER-USER` (forwarded traffic) jumps to `CLAWDEPLOY-TENANTS`, which
//!   lets replies through and rejects new connections from a tenant to any
//!   other tenant bridge and to private, link-local (the metadata service at
//!   169.254.169.254), shared and multicast ranges. The public internet
//!   stays reachable: gateways call LLM providers.
//! - `INPUT` (traffic to the host itself: the agent's ports, the edge, a
//!   Docker API on TCP, sshd) jumps to `CLAWDEPLOY-HOST`, which lets replies
//!   through and rejects everything else.
//! - Both first jump to `CLAWDEPLOY-ALLOW`, which accepts the few endpoints
//!   tenants must reach on a private address or the host (the metering
//!   proxy: `--tenant-allow ip:port`). Allow rules are only ever added
//!   (`-C` or `-A`), never rewritten, so agents on one host with different
//!   lists do not undo each other; an operator removes a stale one.
//!
//! The rules are checked at start-up and every 30 s (a Docker restart or a
//! flush must not leave them gone). The check takes no lock; only when
//! something is missing are they rewritten, under a host-wide lock
//! (`flock`), the chains atomically with `iptables-restore`.

use std::net::SocketAddrV4;

use crate::error::{Error, Result};

/// Prefix of tenant bridge interfaces (Linux allows 15 characters).
pub const BRIDGE_PREFIX: &str = "cdt";

/// Destinations a tenant may not open connections to, by default.
pub const DEFAULT_BLOCKED: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "224.0.0.0/4",
];

/// The bridge interface name for a tenant network: stable per network name.
pub fn bridge_name(network: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(network.as_bytes());
    format!("{BRIDGE_PREFIX}{}", &hex::encode(digest)[..12])
}

fn valid_cidr(c: &str) -> bool {
    let Some((ip, bits)) = c.split_once('/') else {
        return false;
    };
    ip.parse::<std::net::Ipv4Addr>().is_ok() && bits.parse::<u8>().is_ok_and(|b| b <= 32)
}

const ALLOW_CHAIN: &str = "CLAWDEPLOY-ALLOW";

/// The rule that lets tenants reach `to`.
fn allow_rule(to: &SocketAddrV4) -> String {
    format!(
        "{ALLOW_CHAIN} -d {}/32 -p tcp -m tcp --dport {} -j ACCEPT",
        to.ip(),
        to.port()
    )
}

/// The `iptables-restore` input that defines both chains.
fn chains(blocked: &[String]) -> String {
    let mut s = String::from("*filter\n:CLAWDEPLOY-TENANTS - [0:0]\n:CLAWDEPLOY-HOST - [0:0]\n");
    let reject = |chain: &str, matcher: &str, s: &mut String| {
        s.push_str(&format!(
            "-A {chain} {matcher} -p tcp -j REJECT --reject-with tcp-reset\n"
        ));
        s.push_str(&format!(
            "-A {chain} {matcher} -j REJECT --reject-with icmp-port-unreachable\n"
        ));
    };
    s.push_str("-A CLAWDEPLOY-TENANTS -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\n");
    s.push_str(&format!("-A CLAWDEPLOY-TENANTS -j {ALLOW_CHAIN}\n"));
    reject(
        "CLAWDEPLOY-TENANTS",
        &format!("-o {BRIDGE_PREFIX}+"),
        &mut s,
    );
    for cidr in blocked {
        reject("CLAWDEPLOY-TENANTS", &format!("-d {cidr}"), &mut s);
    }
    s.push_str("-A CLAWDEPLOY-TENANTS -j RETURN\n");
    s.push_str("-A CLAWDEPLOY-HOST -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\n");
    s.push_str(&format!("-A CLAWDEPLOY-HOST -j {ALLOW_CHAIN}\n"));
    reject("CLAWDEPLOY-HOST", "", &mut s);
    s.push_str("COMMIT\n");
    s
}

/// Installs (or refreshes) the isolation rules. Fails when the firewall
/// cannot be set: the agent does not run tenants unisolated.
pub async fn install(blocked: &[String], allowed: &[SocketAddrV4]) -> Result<()> {
    run_install(blocked, allowed).await?;
    tracing::info!(
        bridges = format!("{BRIDGE_PREFIX}+"),
        blocked = blocked.join(","),
        "tenant firewall installed: DOCKER-USER -> CLAWDEPLOY-TENANTS (no tenant-to-tenant, no private or metadata ranges), INPUT -> CLAWDEPLOY-HOST (no tenant-to-host)"
    );
    Ok(())
}

/// Whether the jumps and both chains are as `chains()` would write them.
/// Read without the lock: many agents starting at once must not queue
/// behind each other to find the rules already there.
async fn in_place(blocked: &[String], allowed: &[SocketAddrV4]) -> bool {
    let allows: String = allowed
        .iter()
        .map(|a| format!("iptables -w -C {} 2>/dev/null && ", allow_rule(a)))
        .collect();
    let script = format!(
        "{allows}iptables -w -C DOCKER-USER -i {p}+ -j CLAWDEPLOY-TENANTS 2>/dev/null && \
         iptables -w -C INPUT -i {p}+ -j CLAWDEPLOY-HOST 2>/dev/null && \
         iptables -w -S CLAWDEPLOY-TENANTS 2>/dev/null && iptables -w -S CLAWDEPLOY-HOST 2>/dev/null",
        p = BRIDGE_PREFIX
    );
    let Ok(out) = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let have = String::from_utf8_lossy(&out.stdout);
    let want = chains(blocked);
    let count = |text: &str, chain: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .count()
    };
    ["CLAWDEPLOY-TENANTS", "CLAWDEPLOY-HOST"]
        .iter()
        .all(|chain| count(&have, chain) == count(&want, chain))
        && blocked.iter().all(|c| have.contains(&format!("-d {c} ")))
}

async fn run_install(blocked: &[String], allowed: &[SocketAddrV4]) -> Result<()> {
    if let Some(bad) = blocked.iter().find(|c| !valid_cidr(c)) {
        return Err(Error::Firewall(format!("not an IPv4 CIDR: {bad:?}")));
    }
    if in_place(blocked, allowed).await {
        return Ok(());
    }
    let allows: String = allowed
        .iter()
        .map(|a| {
            let rule = allow_rule(a);
            format!("iptables -w -C {rule} 2>/dev/null || iptables -w -A {rule}\n")
        })
        .collect();
    let script = format!(
        r#"set -e
iptables -w -n -L DOCKER-USER >/dev/null 2>&1 || {{ echo "chain DOCKER-USER missing: is Docker managing iptables?" >&2; exit 3; }}
iptables -w -N CLAWDEPLOY-TENANTS 2>/dev/null || true
iptables -w -N CLAWDEPLOY-HOST 2>/dev/null || true
iptables -w -N {ALLOW_CHAIN} 2>/dev/null || true
{allows}iptables-restore -w --noflush <<'RULES'
{rules}RULES
iptables -w -C DOCKER-USER -i {p}+ -j CLAWDEPLOY-TENANTS 2>/dev/null || iptables -w -I DOCKER-USER 1 -i {p}+ -j CLAWDEPLOY-TENANTS
iptables -w -C INPUT -i {p}+ -j CLAWDEPLOY-HOST 2>/dev/null || iptables -w -I INPUT 1 -i {p}+ -j CLAWDEPLOY-HOST
"#,
        rules = chains(blocked),
        p = BRIDGE_PREFIX,
    );
    std::fs::create_dir_all("/run/lock")?;
    let out = tokio::process::Command::new("flock")
        .args([
            "-w",
            "120",
            "/run/lock/clawdeploy-firewall.lock",
            "sh",
            "-c",
        ])
        .arg(&script)
        .output()
        .await
        .map_err(|e| Error::Firewall(format!("running flock/iptables: {e}")))?;
    if !out.status.success() {
        return Err(Error::Firewall(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// Re-installs the rules every `every`: a Docker restart or an operator's
/// flush must not leave tenants unisolated for long. Failures are logged and
/// counted; the next pass tries again.
pub async fn keep_installed(
    blocked: Vec<String>,
    allowed: Vec<SocketAddrV4>,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = run_install(&blocked, &allowed).await {
            metrics::counter!("clawdeploy_agent_firewall_errors_total").increment(1);
            tracing::error!(error = %e, "tenant firewall check failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_linux_interface_names() {
        let b = bridge_name("clawdeploy-some-rather-long-node-name-0123456789");
        assert!(b.len() <= 15 && b.starts_with(BRIDGE_PREFIX), "{b}");
        assert_eq!(
            b,
            bridge_name("clawdeploy-some-rather-long-node-name-0123456789")
        );
        assert_ne!(b, bridge_name("clawdeploy-other"));
    }

    #[test]
    fn rules_let_replies_through_before_rejecting() {
        let r = chains(&["169.254.0.0/16".into()]);
        let est = r.find("CLAWDEPLOY-TENANTS -m conntrack").unwrap();
        let meta = r.find("-d 169.254.0.0/16").unwrap();
        assert!(est < meta);
        assert!(r.contains("-A CLAWDEPLOY-HOST  -p tcp -j REJECT"));
        assert!(valid_cidr("10.0.0.0/8") && !valid_cidr("10.0.0.0/33") && !valid_cidr("x; rm"));
    }
}
