//! A plain HTTP/1.1 connection to a container, driven by the request's own
//! task: the request's head is written, and the answer read, by whoever
//! polls them. hyper's client runs a connection task and a dispatch channel
//! per connection, a handful of task polls and wake-ups a request, which on
//! a cheap route is a visible part of the edge's own work. This path takes
//! the requests that need none of what that machinery is for: no body, no
//! upgrade, and a method that is safe to send again (`GET`, `HEAD`,
//! `OPTIONS`), which is nearly every request on a cheap route. The rest go
//! through hyper's client (`upstream/mod.rs`).
//!
//! Interim (1xx) answers are skipped; a body is read as `framing.rs`
//! frames it, and a body that runs to the connection's end leaves that
//! connection closed.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::framing::{Decoder, Step, MAX_HEAD_BYTES};
use super::{BoxError, Home};
use crate::Error;

/// The most header lines a response head may have.
const MAX_HEADERS: usize = 128;
/// Room each read asks for.
const READ_CHUNK: usize = 8 * 1024;

/// Whether `req` can go over an inline connection: no body, no upgrade,
/// and safe to send again should a kept-alive connection turn out closed.
pub fn suits<B: Body>(req: &Request<B>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && req.body().is_end_stream()
        && !req.headers().contains_key(header::UPGRADE)
}

/// `req`'s head as HTTP/1.1 bytes: the request line (origin form) and its
/// headers as given.
pub fn encode_head<B>(req: &Request<B>, out: &mut Vec<u8>) {
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A kept-alive connection to one container.
pub struct H1Conn {
    io: TcpStream,
    /// Read from the container and not yet used.
    buf: BytesMut,
}

/// A response head read, with how its body is framed and whether the
/// connection may serve another request after it.
pub struct Head {
    pub response: Response<()>,
    decoder: Decoder,
    keep_alive: bool,
}

impl H1Conn {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection may still be used: nothing (its end, an
    /// error, stray bytes) has arrived on it since its last answer. A
    /// system call only when the reactor has seen it readable.
    pub fn is_usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes a request head (`encode_head`) and reads its answer's head.
    /// `Error::UpstreamClosed` means the container had closed the
    /// connection before any of an answer came: the request may go again
    /// on another.
    pub async fn exchange(&mut self, head: &[u8], method: &Method) -> Result<Head, Error> {
        self.io
            .write_all(head)
            .await
            .map_err(closed_or("writing a request to the container"))?;
        let mut interim = false;
        loop {
            if let Some(mut response) = self.parse_head()? {
                // 100 Continue, 103 Early Hints: the final answer follows.
                if response.status().is_informational()
                    && response.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    interim = true;
                    continue;
                }
                let decoder = Decoder::for_response(method, &response)?;
                // Transfer-Encoding overrides Content-Length, which then
                // says nothing true of the body as forwarded; sent both,
                // the framing is suspect (RFC 9112 §6.3) and the connection
                // is not used again. After a 101 it speaks another protocol.
                let headers = response.headers_mut();
                let both = headers.contains_key(header::TRANSFER_ENCODING)
                    && headers.remove(header::CONTENT_LENGTH).is_some();
                let keep_alive = keeps_alive(&response)
                    && decoder.ends_on_its_own()
                    && !both
                    && response.status() != StatusCode::SWITCHING_PROTOCOLS;
                return Ok(Head {
                    response,
                    decoder,
                    keep_alive,
                });
            }
            if self.buf.len() >= MAX_HEAD_BYTES {
                return Err(Error::Upstream("its response head is too large"));
            }
            self.buf.reserve(READ_CHUNK);
            let read = self.io.read_buf(&mut self.buf).await;
            let nothing_yet = self.buf.is_empty() && !interim;
            match read {
                Ok(0) if nothing_yet => return Err(Error::UpstreamClosed),
                Ok(0) => return Err(Error::Upstream("it closed the connection mid-answer")),
                Ok(_) => {}
                Err(e) if nothing_yet => return Err(closed_or("reading from the container")(e)),
                Err(e) => return Err(Error::io("reading from the container")(e)),
            }
        }
    }

    /// The response head at the front of the buffer, when it is all there.
    fn parse_head(&mut self) -> Result<Option<Response<()>>, Error> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut lines);
        let len = match parsed.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Upstream("its response has too many header lines"))
            }
            Err(_) => return Err(Error::Upstream("its response head is malformed")),
        };
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(Error::Upstream("its response has no valid status"))?;
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // Values are slices of the head, not copies: where each one lies.
        let start = self.buf.as_ptr() as usize;
        let mut names = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| Error::Upstream("its response has an invalid header name"))?;
            let at = h.value.as_ptr() as usize - start;
            names.push((name, at..at + h.value.len()));
        }
        let head = self.buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(names.len());
        for (name, range) in names {
            let value = HeaderValue::from_maybe_shared(head.slice(range))
                .map_err(|_| Error::Upstream("its response has an invalid header value"))?;
            headers.append(name, value);
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(Some(response))
    }

    /// Reads more of the answer into the buffer; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        // A read future is a single `poll_read`: dropped while pending, it
        // leaves the waker registered and nothing half done.
        pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }
}

/// Maps an I/O error that says the peer had gone to `UpstreamClosed`.
fn closed_or(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |e| match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => Error::UpstreamClosed,
        _ => Error::io(what)(e),
    }
}

/// Whether the container means to keep the connection open after this
/// answer: HTTP/1.1 without `Connection: close`.
fn keeps_alive(response: &Response<()>) -> bool {
    response.version() == Version::HTTP_11
        && !response
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// A container's response body read straight off its connection, which
/// goes back to its pool (`home`) when the body has ended by its framing
/// and nothing else came after it. A body dropped before its end drops its
/// connection.
pub struct InlineBody {
    conn: Option<H1Conn>,
    decoder: Decoder,
    home: Option<Home>,
}

impl InlineBody {
    pub fn new(conn: H1Conn, head: &Head, home: Home) -> Self {
        let mut body = Self {
            conn: Some(conn),
            decoder: head.decoder,
            home: head.keep_alive.then_some(home),
        };
        if body.decoder == Decoder::Done {
            body.finish();
        }
        body
    }

    /// The body has ended: its connection goes home, if it may.
    fn finish(&mut self) {
        let conn = self.conn.take();
        if let (Some(conn), Some(home)) = (conn, self.home.take()) {
            if conn.buf.is_empty() {
                home.put_back(conn);
            }
        }
    }
}

impl Body for InlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut eof = false;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.step(&mut conn.buf, eof) {
                Ok(Step::Data(data)) => {
                    if this.decoder == Decoder::Done {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => match conn.poll_fill(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => eof = true,
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(Error::io(
                            "reading a response body from the container",
                        )(e)
                        .into())));
                    }
                },
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::super::framing::tests::response;
    use super::*;

    #[test]
    fn only_http11_without_close_is_kept_alive() {
        assert!(keeps_alive(&response(200, &[("connection", "keep-alive")])));
        assert!(!keeps_alive(&response(
            200,
            &[("connection", "Keep-Alive, Close")]
        )));
        let mut old = response(200, &[]);
        *old.version_mut() = Version::HTTP_10;
        assert!(!keeps_alive(&old));
    }

    #[test]
    fn a_request_head_is_written_in_origin_form() {
        let req = Request::get("http://a.x.test/p?q=1")
            .header("host", "a.x.test")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .unwrap();
        let mut out = Vec::new();
        encode_head(&req, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q=1 HTTP/1.1\r\nhost: a.x.test\r\nx-two: 1\r\nx-two: 2\r\n\r\n"
        );
        assert!(suits(
            &Request::head("/")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap()
        ));
        assert!(!suits(
            &Request::post("/")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap()
        ));
        assert!(!suits(
            &Request::get("/")
                .body(http_body_util::Full::new(Bytes::from("x")))
                .unwrap()
        ));
        assert!(!suits(
            &Request::get("/")
                .header("upgrade", "websocket")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap()
        ));
    }

    /// A container on loopback that answers each connection's requests
    /// from `answers` in turn, then closes.
    async fn container(answers: Vec<&'static [u8]>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for a in answers {
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(a).await.unwrap();
            }
        });
        addr
    }

    async fn body_of(conn: H1Conn, head: &Head) -> (Vec<u8>, Option<H1Conn>) {
        let (pool, key) = super::super::tests::a_pool();
        let mut body = InlineBody::new(conn, head, Home::new(&pool, key.clone()));
        let mut out = Vec::new();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            out.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        (out, pool.take_idle::<H1Conn>(&key))
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_a_kept_connection_serves_the_next() {
        let addr = container(vec![
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye",
        ])
        .await;
        let mut conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let head = conn.exchange(get, &Method::GET).await.unwrap();
        assert_eq!(head.response.status(), 200);
        assert_eq!(head.response.headers()["x-a"], "1");
        let (body, back) = body_of(conn, &head).await;
        assert_eq!(body, b"ok");
        let mut conn = back.expect("kept alive");
        assert!(conn.is_usable());
        let head = conn.exchange(get, &Method::GET).await.unwrap();
        let (body, back) = body_of(conn, &head).await;
        assert_eq!(body, b"hi");
        let mut conn = back.expect("kept alive after a chunked body");
        let head = conn.exchange(get, &Method::GET).await.unwrap();
        let (body, back) = body_of(conn, &head).await;
        assert_eq!(body, b"bye");
        assert!(back.is_none(), "Connection: close is not kept");
    }

    #[tokio::test]
    async fn a_connection_the_container_closed_says_so_and_is_not_usable() {
        let addr = container(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]).await;
        let mut conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let head = conn.exchange(get, &Method::GET).await.unwrap();
        assert_eq!(head.response.status(), 204);
        // The container closes after its one answer.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while conn.is_usable() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(matches!(
            conn.exchange(get, &Method::GET).await,
            Err(Error::UpstreamClosed)
        ));
    }

    #[tokio::test]
    async fn a_suspect_framing_or_an_unasked_switch_is_answered_but_not_kept() {
        let addr = container(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        ])
        .await;
        let mut conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let head = conn.exchange(get, &Method::GET).await.unwrap();
        assert!(!head.response.headers().contains_key(header::CONTENT_LENGTH));
        let (body, back) = body_of(conn, &head).await;
        assert_eq!(body, b"hi");
        assert!(
            back.is_none(),
            "Transfer-Encoding with Content-Length is not kept"
        );

        let addr = container(vec![
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        ])
        .await;
        let mut conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        let head = conn.exchange(get, &Method::GET).await.unwrap();
        assert_eq!(head.response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let (body, back) = body_of(conn, &head).await;
        assert!(body.is_empty());
        assert!(back.is_none(), "a switched connection is not kept");
    }

    #[tokio::test]
    async fn a_malformed_answer_is_an_error_not_a_response() {
        let addr = container(vec![b"HTTP/1.1 abc\r\n\r\n"]).await;
        let mut conn = H1Conn::new(TcpStream::connect(addr).await.unwrap());
        assert!(matches!(
            conn.exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET).await,
            Err(Error::Upstream(_))
        ));
    }
}
