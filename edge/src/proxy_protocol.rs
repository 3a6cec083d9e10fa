//! The PROXY protocol (versions 1 and 2, as HAProxy specifies them) on
//! connections from a load balancer: the header that comes before the
//! first byte of TLS or HTTP and names the client's address. It is read
//! only from configured source ranges (the load balancer's), where it is
//! required; a connection from anywhere else is a direct client and its
//! bytes are never taken for a header (a client cannot claim an address).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Version 2's 12-byte signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// What a version 2 header may carry after its 16 bytes (addresses and
/// TLVs); more is refused.
const V2_MAX_PAYLOAD: usize = 1024;

/// An address range, `10.0.0.0/16` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s}: not an IP address range"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s}: the prefix must be 0 to {max}"))?
        };
        Ok(Cidr { net, prefix })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("the connection closed before a PROXY header")]
    Closed,
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// Reads one PROXY header, and not a byte more. `Ok(Some(addr))`: the
/// client's address; `Ok(None)`: the balancer speaking for itself (v2
/// `LOCAL`, v1 `UNKNOWN`: a health check), so the peer's own address
/// stands.
pub async fn read_header<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<Option<SocketAddr>, HeaderError> {
    let mut head = [0u8; 16];
    read(s, &mut head[..6]).await?;
    if &head[..6] == b"PROXY " {
        let mut line = head[..6].to_vec();
        // Byte by byte: the header's end is the CRLF, and what follows is
        // the client's TLS or HTTP.
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(HeaderError::Malformed("version 1 line too long"));
            }
            let mut b = [0u8; 1];
            read(s, &mut b).await?;
            line.push(b[0]);
        }
        return parse_v1(&line[..line.len() - 2]);
    }
    if head[..6] != V2_SIGNATURE[..6] {
        return Err(HeaderError::Missing);
    }
    read(s, &mut head[6..]).await?;
    if head[..12] != V2_SIGNATURE {
        return Err(HeaderError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(HeaderError::Malformed("version 2 payload too long"));
    }
    let mut payload = vec![0u8; len];
    read(s, &mut payload).await?;
    parse_v2(head[12], head[13], &payload)
}

async fn read<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<(), HeaderError> {
    s.read_exact(buf)
        .await
        .map(drop)
        .map_err(|_| HeaderError::Closed)
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>` (without the CRLF).
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    let line = std::str::from_utf8(line).map_err(|_| HeaderError::Malformed("not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let family = parts.next().ok_or(HeaderError::Malformed("no family"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err(HeaderError::Malformed("version 1 needs four fields"));
    };
    let ip: IpAddr = match family {
        "TCP4" => src
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| HeaderError::Malformed("bad IPv4 source"))?,
        "TCP6" => src
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| HeaderError::Malformed("bad IPv6 source"))?,
        _ => return Err(HeaderError::Malformed("unknown family")),
    };
    let port: u16 = sport
        .parse()
        .map_err(|_| HeaderError::Malformed("bad source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

fn parse_v2(
    version_command: u8,
    family: u8,
    payload: &[u8],
) -> Result<Option<SocketAddr>, HeaderError> {
    if version_command >> 4 != 2 {
        return Err(HeaderError::Malformed("version 2 expected"));
    }
    match version_command & 0x0f {
        0 => return Ok(None), // LOCAL
        1 => {}               // PROXY
        _ => return Err(HeaderError::Malformed("unknown command")),
    }
    match family {
        // TCP over IPv4: src(4) dst(4) sport(2) dport(2).
        0x11 if payload.len() >= 12 => {
            let ip = Ipv4Addr::new(payload[0], payload[1], payload[2], payload[3]);
            let port = u16::from_be_bytes([payload[8], payload[9]]);
            Ok(Some(SocketAddr::new(ip.into(), port)))
        }
        // TCP over IPv6: src(16) dst(16) sport(2) dport(2).
        0x21 if payload.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&payload[..16]);
            let port = u16::from_be_bytes([payload[32], payload[33]]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port)))
        }
        // UNSPEC: the balancer does not know; its own address stands.
        0x00 => Ok(None),
        0x11 | 0x21 => Err(HeaderError::Malformed("address block too short")),
        _ => Err(HeaderError::Malformed("unsupported address family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let mut s = bytes;
        let r = read_header(&mut s).await;
        (r, s.to_vec())
    }

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    #[tokio::test]
    async fn version_1_names_the_client_and_leaves_the_rest() {
        let (r, rest) = parse(b"PROXY TCP4 203.0.113.7 10.0.0.2 51234 443\r\n\x16\x03\x01").await;
        assert_eq!(r, Ok(Some("203.0.113.7:51234".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03\x01");
        let (r, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\nGET").await;
        assert_eq!(r, Ok(Some("[2001:db8::1]:4000".parse().unwrap())));
        let (r, rest) = parse(b"PROXY UNKNOWN\r\nGET / HTTP/1.1").await;
        assert_eq!(r, Ok(None));
        assert_eq!(rest, b"GET / HTTP/1.1");
    }

    #[tokio::test]
    async fn version_2_names_the_client_and_leaves_the_rest() {
        let mut p = vec![198, 51, 100, 9, 10, 0, 0, 2];
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&443u16.to_be_bytes());
        p.extend_from_slice(&[0x04, 0x00, 0x01, 0xAA]); // a TLV, skipped
        let mut bytes = v2(1, 0x11, &p);
        bytes.extend_from_slice(b"\x16\x03");
        let (r, rest) = parse(&bytes).await;
        assert_eq!(r, Ok(Some("198.51.100.9:40000".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03");
        let mut p6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        p6.extend_from_slice(&[0; 16]);
        p6.extend_from_slice(&5555u16.to_be_bytes());
        p6.extend_from_slice(&443u16.to_be_bytes());
        let (r, _) = parse(&v2(1, 0x21, &p6)).await;
        assert_eq!(r, Ok(Some("[2001:db8::7]:5555".parse().unwrap())));
        // LOCAL: a health check from the balancer itself.
        let (r, _) = parse(&v2(0, 0x00, &[])).await;
        assert_eq!(r, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n").await.0,
            Err(HeaderError::Missing)
        );
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00\x01").await.0,
            Err(HeaderError::Missing)
        );
        assert_eq!(parse(b"PROX").await.0, Err(HeaderError::Closed));
        assert!(matches!(
            parse(b"PROXY TCP4 not-an-ip 10.0.0.2 1 2\r\n").await.0,
            Err(HeaderError::Malformed(_))
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            parse(long.as_bytes()).await.0,
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(&v2(1, 0x11, &[1, 2, 3])).await.0,
            Err(HeaderError::Malformed(_))
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            parse(&huge).await.0,
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn ranges_match_by_prefix() {
        let r: Cidr = "10.0.0.0/16".parse().unwrap();
        assert!(r.contains("10.0.255.1".parse().unwrap()));
        assert!(!r.contains("10.1.0.1".parse().unwrap()));
        assert!(r.contains("::ffff:10.0.1.1".parse().unwrap()));
        let one: Cidr = "127.0.0.9".parse().unwrap();
        assert!(one.contains("127.0.0.9".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }
}
