//! HTTP/1.1 heads on the fast path, decided without I/O: which requests it takes (the rest are
//! handed to the general path), how a request head is rewritten for the upstream, how a
//! response body is framed and its head rewritten for the client. The rewriting follows the
//! general path's rules (`forward.rs`): hop-by-hop headers and those `Connection` names are
//! dropped, `X-Forwarded-*` and the mapping's headers set.

use http::{HeaderName, HeaderValue};

use crate::proxy::policy::HOPS;

/// Request bodies up to this size are read whole before forwarding; larger ones (and chunked
/// uploads) stream through the general path.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// Why a request leaves the fast path for the general one (which answers it fully).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Not HTTP/1.1.
    Version,
    /// Not origin-form (`/path`): absolute-form, `*`, a fragment, or bytes the general path's
    /// URI parser refuses (it answers 400).
    RequestTarget,
    /// `CONNECT`: a tunnel, not a request with a body.
    Method,
    /// No Host header, or more than one.
    Host,
    /// More than one `Connection` header.
    Connection,
    /// A protocol upgrade (WebSocket).
    Upgrade,
    /// `Expect: 100-continue`.
    Expect,
    /// A `Transfer-Encoding` request body.
    TransferEncoding,
    /// A `Content-Length` that is not one plain number.
    ContentLength,
    /// A body larger than [`MAX_BUFFERED_BODY`].
    LargeBody,
    /// A `tunnox-hops` value that is not a number (the general path answers 400).
    Hops,
    /// A header only a proxy of the fleet sets (`tunnel::INTERNAL_HEADERS`): the general path
    /// checks the node token (403 when wrong) and removes them.
    TunnelHeader,
    /// An ACME HTTP-01 challenge, answered from the store by the general path.
    AcmeChallenge,
}

impl Handover {
    /// A bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Version => "version",
            Self::RequestTarget => "request_target",
            Self::Method => "method",
            Self::Host => "host",
            Self::Connection => "connection",
            Self::Upgrade => "upgrade",
            Self::Expect => "expect",
            Self::TransferEncoding => "transfer_encoding",
            Self::ContentLength => "content_length",
            Self::LargeBody => "large_body",
            Self::Hops => "hops",
            Self::TunnelHeader => "tunnel_header",
            Self::AcmeChallenge => "acme_challenge",
        }
    }
}

/// What the fast path needs to know about a request it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// The Host header exactly as sent.
    pub host: &'a [u8],
    pub content_length: usize,
    /// A `Content-Length` header was sent (and is sent on).
    pub has_length: bool,
    /// The client asked to close the connection after this request.
    pub close: bool,
    /// The value of the `Connection` header, whose tokens name more headers to drop.
    pub connection: Option<&'a [u8]>,
    pub is_head: bool,
    /// Proxies of this fleet the request passed through (`tunnox-hops`).
    pub hops: u32,
}

/// Headers the rewriting treats specially. Names compare case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host,
    Connection,
    ContentLength,
    TransferEncoding,
    Upgrade,
    Expect,
    Te,
    /// Other headers meaningful for one connection only (RFC 9110 §7.6.1).
    HopByHop,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    /// `tunnox-hops`: the proxy's own, replaced.
    Hops,
    /// Headers only a proxy of the fleet sets (`tunnel::INTERNAL_HEADERS`).
    Tunnel,
    Other,
}

fn kind(name: &str) -> Kind {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 if is("te") => Kind::Te,
        4 if is("host") => Kind::Host,
        6 if is("expect") => Kind::Expect,
        7 if is("upgrade") => Kind::Upgrade,
        7 if is("trailer") => Kind::HopByHop,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::HopByHop,
        11 if is("tunnox-hops") => Kind::Hops,
        11 if is("tunnox-node") => Kind::Tunnel,
        12 if is("tunnox-error") => Kind::Tunnel,
        13 if is("tunnox-target") => Kind::Tunnel,
        13 if is("tunnox-client") => Kind::Tunnel,
        14 if is("tunnox-control") => Kind::Tunnel,
        14 if is("content-length") => Kind::ContentLength,
        15 if is("x-forwarded-for") => Kind::XForwardedFor,
        15 if is("tunnox-from-set") => Kind::Tunnel,
        16 if is("proxy-connection") => Kind::HopByHop,
        16 if is("x-forwarded-host") => Kind::XForwardedHost,
        16 if is("tunnox-transport") => Kind::Tunnel,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        17 if is("x-forwarded-proto") => Kind::XForwardedProto,
        18 if is("proxy-authenticate") => Kind::HopByHop,
        19 if is("proxy-authorization") => Kind::HopByHop,
        _ => Kind::Other,
    }
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn has_token(value: &[u8], token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether `Connection: value` names the header `name`.
fn named_by(connection: Option<&[u8]>, name: &str) -> bool {
    connection.is_some_and(|c| tokens(c).any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
}

/// A `Content-Length` value: digits only, no sign, no list.
fn parse_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Decides whether the fast path takes `req` (a complete, parsed head).
pub fn classify_request<'a>(req: &httparse::Request<'_, 'a>) -> Result<RequestHead<'a>, Handover> {
    if req.version != Some(1) {
        return Err(Handover::Version);
    }
    let path = req.path.unwrap_or("");
    if !path.starts_with('/')
        || path.contains('#')
        || http::uri::PathAndQuery::try_from(path).is_err()
    {
        return Err(Handover::RequestTarget);
    }
    if path.starts_with(crate::store::CHALLENGE_PATH) {
        return Err(Handover::AcmeChallenge);
    }
    if req.method == Some("CONNECT") {
        return Err(Handover::Method);
    }
    let mut host = None;
    let mut connection = None;
    let mut length = None;
    let mut hops = None;
    for h in req.headers.iter() {
        match kind(h.name) {
            Kind::Hops => {
                let n = crate::proxy::policy::parse_hops([h.value]).map_err(|_| Handover::Hops)?;
                hops = Some(hops.unwrap_or(0).max(n));
            }
            Kind::Host if host.is_some() => return Err(Handover::Host),
            Kind::Host => host = Some(h.value),
            Kind::Connection if connection.is_some() => return Err(Handover::Connection),
            Kind::Connection => connection = Some(h.value),
            Kind::ContentLength if length.is_some() => return Err(Handover::ContentLength),
            Kind::ContentLength => {
                length = Some(parse_length(h.value).ok_or(Handover::ContentLength)?);
            }
            Kind::TransferEncoding => return Err(Handover::TransferEncoding),
            Kind::Upgrade => return Err(Handover::Upgrade),
            Kind::Expect => return Err(Handover::Expect),
            Kind::Tunnel => return Err(Handover::TunnelHeader),
            _ => {}
        }
    }
    let host = host.ok_or(Handover::Host)?;
    if connection.is_some_and(|c| has_token(c, "upgrade")) {
        return Err(Handover::Upgrade);
    }
    let content_length = length.unwrap_or(0);
    if content_length > MAX_BUFFERED_BODY {
        return Err(Handover::LargeBody);
    }
    Ok(RequestHead {
        host,
        content_length,
        has_length: length.is_some(),
        close: connection.is_some_and(|c| has_token(c, "close")),
        connection,
        is_head: req.method == Some("HEAD"),
        hops: hops.unwrap_or(0),
    })
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub(super) fn push_length(out: &mut Vec<u8>, n: u64) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "content-length: {n}\r\n");
}

/// Visible ASCII (and tabs): what the general path accepts as header text.
fn is_text(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Writes the head the upstream receives for `req` into `out`. The framing header is the
/// proxy's own (never dropped or replaced); the mapping's headers replace the client's and the
/// proxy's `Host` / `X-Forwarded-*` of the same name.
pub fn write_request_head(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    head: &RequestHead<'_>,
    peer_ip: &str,
    proto: &str,
    hops: u32,
    extra: &[(HeaderName, HeaderValue)],
) {
    let overridden = |name: &str| {
        extra
            .iter()
            .any(|(n, _)| name.eq_ignore_ascii_case(n.as_str()))
    };
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !overridden("host") {
        push_header(out, b"host", head.host);
    }
    let mut te_trailers = false;
    let keep_forwarded_for = !named_by(head.connection, "x-forwarded-for");
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    for h in req.headers.iter() {
        match kind(h.name) {
            Kind::Te => te_trailers |= has_token(h.value, "trailers"),
            Kind::XForwardedFor if keep_forwarded_for && is_text(h.value) => {
                forwarded_for.push(h.value);
            }
            Kind::Other if !named_by(head.connection, h.name) && !overridden(h.name) => {
                push_header(out, h.name.as_bytes(), h.value);
            }
            // Framing and hop-by-hop headers, and what the proxy sets itself.
            _ => {}
        }
    }
    if head.has_length {
        push_length(out, head.content_length as u64);
    }
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    if !overridden("x-forwarded-for") {
        out.extend_from_slice(b"x-forwarded-for: ");
        for prev in &forwarded_for {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(peer_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !overridden("x-forwarded-proto") {
        push_header(out, b"x-forwarded-proto", proto.as_bytes());
    }
    if !overridden("x-forwarded-host") {
        push_header(out, b"x-forwarded-host", head.host);
    }
    {
        use std::io::Write;
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{HOPS}: {hops}\r\n");
    }
    for (name, value) in extra {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes: the client's connection closes after it too.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    pub status: u16,
    pub framing: Framing,
    /// The upstream connection cannot carry another request.
    pub upstream_closes: bool,
    pub connection: Option<&'a [u8]>,
}

/// Reads the framing of a response (RFC 9112 §6.3) to a request that was (not) `HEAD`.
/// `Err` names what makes the response unusable.
pub fn classify_response<'a>(
    resp: &httparse::Response<'_, 'a>,
    request_was_head: bool,
) -> Result<ResponseHead<'a>, &'static str> {
    let status = resp.code.ok_or("no status")?;
    let mut connection: Option<&[u8]> = None;
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = false;
    for h in resp.headers.iter() {
        match kind(h.name) {
            Kind::Connection => {
                if connection.is_some() {
                    return Err("more than one Connection header");
                }
                connection = Some(h.value);
                keep_alive = has_token(h.value, "keep-alive");
            }
            Kind::ContentLength => {
                let n = parse_length(h.value).ok_or("malformed Content-Length")?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length headers");
                }
                length = Some(n);
            }
            Kind::TransferEncoding => {
                if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err("unsupported Transfer-Encoding");
                }
                chunked = true;
            }
            _ => {}
        }
    }
    let framing =
        if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::None
        } else if chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n as u64)
        } else {
            Framing::UntilClose
        };
    let close_token = connection.is_some_and(|c| has_token(c, "close"));
    let http10 = resp.version == Some(0);
    Ok(ResponseHead {
        status,
        framing,
        upstream_closes: close_token || (http10 && !keep_alive) || framing == Framing::UntilClose,
        connection,
    })
}

/// Writes the head the client receives into `out`; `close` adds `Connection: close`, `date` is
/// added when the upstream sent none. The body's length (or chunking) is stated by the proxy.
pub fn write_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    head: &ResponseHead<'_>,
    close: bool,
    date: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse only accepts three-digit status codes.
    let code = head.status.min(999);
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]);
    out.push(b' ');
    let reason = resp.reason.filter(|r| !r.is_empty()).unwrap_or_else(|| {
        http::StatusCode::from_u16(head.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
    });
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for h in resp.headers.iter() {
        let keep = match kind(h.name) {
            // A bodiless response's length describes the resource (HEAD, 304): passed on.
            Kind::ContentLength => head.framing == Framing::None,
            Kind::Connection
            | Kind::HopByHop
            | Kind::Te
            | Kind::Upgrade
            | Kind::TransferEncoding => false,
            _ => !named_by(head.connection, h.name),
        };
        if keep {
            has_date |= h.name.eq_ignore_ascii_case("date");
            push_header(out, h.name.as_bytes(), h.value);
        }
    }
    match head.framing {
        Framing::Length(n) => push_length(out, n),
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::UntilClose => {}
    }
    if !has_date {
        push_header(out, b"date", date);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
#[path = "head_tests.rs"]
mod tests;
