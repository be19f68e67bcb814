//! Finding the end of a chunked body (RFC 9112 §7.1) that is passed on unchanged: chunk sizes
//! and trailers are parsed with httparse, the data is only counted.

/// The longest chunk-size line (with extensions) or trailer section waited for.
const MAX_LINE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data; how many of its two bytes were seen.
    DataEnd(u8),
    Trailers,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("malformed chunk size")]
    Size,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("malformed trailers")]
    Trailers,
    #[error("chunk-size line or trailers longer than {MAX_LINE} bytes")]
    TooLong,
}

/// Scans a chunked body as it arrives.
#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    /// Data bytes seen (the body without its framing).
    pub data_bytes: u64,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self {
            state: State::Size,
            data_bytes: 0,
        }
    }
}

impl ChunkedScanner {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes the next bytes of the body and returns how many of them belong to it. Fewer than
    /// `buf.len()` means either the body ended ([`Self::is_done`]) or an incomplete size line or
    /// trailer section: call again with those bytes and more.
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, ChunkError> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                State::Done => return Ok(at),
                _ if rest.is_empty() => return Ok(at),
                State::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, 0))) => {
                        at += n;
                        self.state = State::Trailers;
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        at += n;
                        self.state = State::Data(size);
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_LINE => {
                        return Err(ChunkError::TooLong);
                    }
                    Ok(httparse::Status::Partial) => return Ok(at),
                    Err(_) => return Err(ChunkError::Size),
                },
                State::Data(left) => {
                    let n = left.min(rest.len() as u64);
                    at += n as usize;
                    self.data_bytes += n;
                    self.state = match left - n {
                        0 => State::DataEnd(0),
                        left => State::Data(left),
                    };
                }
                State::DataEnd(seen) => {
                    let want = b"\r\n"[usize::from(seen)];
                    if rest[0] != want {
                        return Err(ChunkError::DataEnd);
                    }
                    at += 1;
                    self.state = if seen == 0 {
                        State::DataEnd(1)
                    } else {
                        State::Size
                    };
                }
                State::Trailers => {
                    let mut headers = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(rest, &mut headers) {
                        Ok(httparse::Status::Complete((n, _))) => {
                            at += n;
                            self.state = State::Done;
                        }
                        Ok(httparse::Status::Partial) if rest.len() > MAX_LINE => {
                            return Err(ChunkError::TooLong);
                        }
                        Ok(httparse::Status::Partial) => return Ok(at),
                        Err(_) => return Err(ChunkError::Trailers),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `body` in pieces of `step` bytes the way the proxy does (unconsumed bytes are kept
    /// and offered again with the next piece); returns (bytes of the body, data bytes), with
    /// `usize::MAX` bytes for a body that has not ended.
    fn scan(body: &[u8], step: usize) -> Result<(usize, u64), ChunkError> {
        let mut s = ChunkedScanner::default();
        let mut pending = Vec::new();
        let mut total = 0;
        for piece in body.chunks(step.max(1)) {
            pending.extend_from_slice(piece);
            let n = s.advance(&pending)?;
            total += n;
            pending.drain(..n);
            if s.is_done() {
                return Ok((total, s.data_bytes));
            }
        }
        // Incomplete: the body has not ended yet.
        Ok((usize::MAX, s.data_bytes))
    }

    #[test]
    fn finds_the_end_of_a_body() {
        type Case = (&'static str, Result<(usize, u64), ChunkError>);
        let cases: &[Case] = &[
            ("0\r\n\r\n", Ok((5, 0))),
            ("5\r\nhello\r\n0\r\n\r\nNEXT", Ok((15, 5))),
            (
                "5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nNEXT",
                Ok((44, 15)),
            ),
            ("5\r\nhelloXX0\r\n\r\n", Err(ChunkError::DataEnd)),
            ("z\r\n", Err(ChunkError::Size)),
            ("0\r\nbad trailer\r\n\r\n", Err(ChunkError::Trailers)),
            ("5\r\nhel", Ok((usize::MAX, 3))),
        ];
        for (body, want) in cases {
            for step in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    &scan(body.as_bytes(), step),
                    want,
                    "{body:?} in steps of {step}"
                );
            }
        }
    }

    #[test]
    fn refuses_endless_size_lines() {
        let mut s = ChunkedScanner::default();
        let line = format!("5;{}", "x".repeat(MAX_LINE + 1));
        assert_eq!(s.advance(line.as_bytes()), Err(ChunkError::TooLong));
    }

    proptest! {
        /// Any body built from chunks is found whole, at any split, and never read past.
        #[test]
        fn any_chunking_any_split(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8), step in 1usize..64) {
            let mut body = Vec::new();
            let mut data = 0u64;
            for c in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
                data += c.len() as u64;
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let len = body.len();
            body.extend_from_slice(b"GET / HTTP/1.1\r\n");
            prop_assert_eq!(scan(&body, step), Ok((len, data)));
        }

        /// Garbage is refused or waited on, never a panic.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), step in 1usize..64) {
            let _ = scan(&bytes, step);
        }
    }
}
