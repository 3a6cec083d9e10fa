//! How an HTTP/1.1 response body is framed (RFC 9112 §6.3) and read off
//! the bytes a connection has received: by the request's method and the
//! status, then `Transfer-Encoding: chunked`, then `Content-Length`, else
//! to the connection's end. Pure over a buffer, so every split of the
//! bytes can be tested without a socket.

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Response, StatusCode};
use hyper::body::SizeHint;

use crate::Error;

/// The largest response head (or chunked trailer section) read.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Where a response body is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decoder {
    /// This many bytes are left.
    Length(u64),
    /// A chunked body, at this point of its grammar.
    Chunked(Chunk),
    /// Everything until the connection ends.
    UntilClose,
    /// The body has ended.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk's data are left.
    Data(u64),
    /// The CRLF that closes a chunk's data is next.
    DataEnd,
    /// The trailer section (after the last, empty chunk), this many bytes in.
    Trailers(usize),
}

/// What the decoder made of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Data(Bytes),
    /// More bytes are needed.
    More,
    End,
}

impl Decoder {
    /// How the body of `response` to a `method` request is framed.
    pub(super) fn for_response(method: &Method, response: &Response<()>) -> Result<Self, Error> {
        let status = response.status();
        if *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Decoder::Done);
        }
        let headers = response.headers();
        if headers.contains_key(header::TRANSFER_ENCODING) {
            // Chunked only when it is the last coding; a body in any other
            // coding runs to the connection's end.
            let last = headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim);
            return Ok(match last {
                Some(t) if t.eq_ignore_ascii_case("chunked") => Decoder::Chunked(Chunk::Size),
                _ => Decoder::UntilClose,
            });
        }
        let mut length = None;
        for value in headers.get_all(header::CONTENT_LENGTH) {
            let n = value
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(Error::Upstream(
                    "its response has an invalid Content-Length",
                ))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Upstream("its response has two Content-Lengths"));
            }
            length = Some(n);
        }
        Ok(match length {
            None => Decoder::UntilClose,
            Some(0) => Decoder::Done,
            Some(n) => Decoder::Length(n),
        })
    }

    /// Whether the body ends by its own framing, so that the connection
    /// can carry another request after it.
    pub(super) fn ends_on_its_own(&self) -> bool {
        *self != Decoder::UntilClose
    }

    /// The next piece of the body from `buf`; `eof`: the connection has
    /// ended and `buf` is all there is.
    pub(super) fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, Error> {
        loop {
            match self {
                Decoder::Done => return Ok(Step::End),
                Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Step::End);
                }
                Decoder::Length(left) | Decoder::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return if eof {
                            Err(Error::Upstream("its response body was cut short"))
                        } else {
                            Ok(Step::More)
                        };
                    }
                    let take = (*left).min(buf.len() as u64);
                    *left -= take;
                    let data = buf.split_to(take as usize).freeze();
                    // A body or chunk taken whole moves on at once, so
                    // that the body's end is seen with its last data.
                    match self {
                        Decoder::Length(0) => *self = Decoder::Done,
                        Decoder::Chunked(c @ Chunk::Data(0)) => *c = Chunk::DataEnd,
                        _ => {}
                    }
                    return Ok(Step::Data(data));
                }
                Decoder::UntilClose => {
                    if !buf.is_empty() {
                        return Ok(Step::Data(buf.split().freeze()));
                    }
                    if eof {
                        *self = Decoder::Done;
                        return Ok(Step::End);
                    }
                    return Ok(Step::More);
                }
                Decoder::Chunked(chunk) => {
                    let Some(line) = take_line(buf, chunk_line_limit(chunk))? else {
                        return if eof {
                            Err(Error::Upstream("its chunked body was cut short"))
                        } else {
                            Ok(Step::More)
                        };
                    };
                    match chunk {
                        Chunk::Size => {
                            let size = chunk_size(&line)?;
                            *chunk = if size == 0 {
                                Chunk::Trailers(0)
                            } else {
                                Chunk::Data(size)
                            };
                        }
                        Chunk::DataEnd if line.is_empty() => *chunk = Chunk::Size,
                        Chunk::DataEnd => {
                            return Err(Error::Upstream("its chunk data overran its size"))
                        }
                        // Trailers are read and dropped: nothing the edge
                        // forwards declares them.
                        Chunk::Trailers(_) if line.is_empty() => *self = Decoder::Done,
                        Chunk::Trailers(seen) => {
                            *seen += line.len() + 2;
                            if *seen > MAX_HEAD_BYTES {
                                return Err(Error::Upstream("its trailers are too large"));
                            }
                        }
                        Chunk::Data(_) => unreachable!("data is taken above"),
                    }
                }
            }
        }
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        match self {
            Decoder::Length(n) => SizeHint::with_exact(*n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

fn chunk_line_limit(chunk: &Chunk) -> usize {
    match chunk {
        Chunk::Trailers(seen) => MAX_HEAD_BYTES.saturating_sub(*seen).max(2),
        _ => MAX_CHUNK_LINE,
    }
}

/// The line at the front of `buf` without its CRLF (a bare LF is taken as
/// well), when it is all there; longer than `limit` is an error.
fn take_line(buf: &mut BytesMut, limit: usize) -> Result<Option<Bytes>, Error> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i > limit => Err(Error::Upstream("its chunked framing has an overlong line")),
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line.freeze()))
        }
        None if buf.len() > limit => {
            Err(Error::Upstream("its chunked framing has an overlong line"))
        }
        None => Ok(None),
    }
}

/// A chunk-size line's size: hex digits, then optional `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let bad = Error::Upstream("its chunk size is malformed");
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad);
    }
    let text =
        std::str::from_utf8(digits).map_err(|_| Error::Upstream("its chunk size is malformed"))?;
    u64::from_str_radix(text, 16).map_err(|_| bad)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn response(status: u16, headers: &[(&str, &str)]) -> Response<()> {
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    /// Feeds `wire` to a decoder `split` bytes at a time; the body it gave,
    /// or the first error.
    fn decode(mut d: Decoder, wire: &[u8], split: usize) -> Result<(Vec<u8>, BytesMut), Error> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut rest = wire;
        loop {
            match d.step(&mut buf, rest.is_empty())? {
                Step::Data(b) => body.extend_from_slice(&b),
                Step::End => return Ok((body, buf)),
                Step::More => {
                    let n = split.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }

    #[test]
    fn framing_follows_method_status_coding_and_length() {
        let get = Method::GET;
        let f = |m: &Method, r: Response<()>| Decoder::for_response(m, &r).unwrap();
        assert_eq!(
            f(&Method::HEAD, response(200, &[("content-length", "9")])),
            Decoder::Done
        );
        assert_eq!(f(&get, response(204, &[])), Decoder::Done);
        assert_eq!(
            f(&get, response(304, &[("content-length", "9")])),
            Decoder::Done
        );
        assert_eq!(
            f(&get, response(200, &[("content-length", "9")])),
            Decoder::Length(9)
        );
        assert_eq!(
            f(
                &get,
                response(200, &[("content-length", "9"), ("content-length", "9")])
            ),
            Decoder::Length(9)
        );
        // Transfer-Encoding wins over Content-Length; chunked must be last.
        assert_eq!(
            f(
                &get,
                response(
                    200,
                    &[
                        ("transfer-encoding", "gzip, Chunked"),
                        ("content-length", "3")
                    ]
                )
            ),
            Decoder::Chunked(Chunk::Size)
        );
        assert_eq!(
            f(&get, response(200, &[("transfer-encoding", "gzip")])),
            Decoder::UntilClose
        );
        assert_eq!(f(&get, response(200, &[])), Decoder::UntilClose);
        for bad in [
            &[("content-length", "9"), ("content-length", "8")][..],
            &[("content-length", "-1")],
            &[("content-length", "+9")],
        ] {
            assert!(matches!(
                Decoder::for_response(&get, &response(200, bad)),
                Err(Error::Upstream(_))
            ));
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length_and_leaves_what_follows() {
        for split in [1, 3, 1000] {
            let (body, left) = decode(Decoder::Length(5), b"hello", split).unwrap();
            assert_eq!(body, b"hello");
            assert!(left.is_empty());
        }
        let mut buf = BytesMut::from(&b"helloHTTP/1.1"[..]);
        let mut d = Decoder::Length(5);
        assert_eq!(
            d.step(&mut buf, false).unwrap(),
            Step::Data(Bytes::from_static(b"hello"))
        );
        assert_eq!(d.step(&mut buf, false).unwrap(), Step::End);
        assert_eq!(&buf[..], b"HTTP/1.1");
        assert!(matches!(
            decode(Decoder::Length(9), b"short", 2),
            Err(Error::Upstream(_))
        ));
    }

    #[test]
    fn a_chunked_body_decodes_in_any_split_with_extensions_and_trailers() {
        let wire = b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: yes\r\n\r\n";
        for split in [1, 2, 7, 1000] {
            let (body, left) = decode(Decoder::Chunked(Chunk::Size), wire, split).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "split {split}");
            assert!(left.is_empty());
        }
        // Bare LFs, as lenient peers send them.
        let (body, _) = decode(Decoder::Chunked(Chunk::Size), b"3\nabc\n0\n\n", 1000).unwrap();
        assert_eq!(body, b"abc");
    }

    #[test]
    fn a_broken_chunked_body_is_an_error() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhel",
            b"5\r\nhello\r\n0\r\n",
            b"ffffffffffffffff\r\n",
        ] {
            assert!(
                matches!(
                    decode(Decoder::Chunked(Chunk::Size), wire, 1000),
                    Err(Error::Upstream(_))
                ),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = [b'1'; MAX_CHUNK_LINE + 10];
        assert!(decode(Decoder::Chunked(Chunk::Size), &long, 1000).is_err());
    }

    #[test]
    fn a_body_to_the_end_takes_everything() {
        let (body, _) = decode(Decoder::UntilClose, b"all of it", 4).unwrap();
        assert_eq!(body, b"all of it");
    }
}
