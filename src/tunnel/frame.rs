//! The seed's frame (seed 002): `Magic(4) | Type(1) | Length(4, big-endian) | Data(Length)`.
//!
//! Decoding never trusts `Length` with memory: a length above [`MAX_FRAME`] is refused from the
//! 9-byte header alone, before anything is allocated for the body. Pure: bytes in, frames or an
//! error out; the async helpers read with exact reads (nothing past the frame is consumed).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `TNOX`.
pub const MAGIC: [u8; 4] = *b"TNOX";
/// Header bytes before the body.
pub const HEADER_LEN: usize = 9;
/// The largest body accepted: control messages are small JSON documents.
pub const MAX_FRAME: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?} (expected \"TNOX\"): not a tunnox tunnel peer")]
    Magic([u8; 4]),
    #[error("frame of {len} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge { len: u64 },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("connection closed")]
    Closed,
    #[error("read: {0}")]
    Io(String),
}

impl Frame {
    pub fn new(kind: u8, body: impl Into<Bytes>) -> Self {
        Self {
            kind,
            body: body.into(),
        }
    }

    /// The frame's bytes. Panics never: a body over [`MAX_FRAME`] is the caller's bug and is
    /// refused by every decoder, so encoders check with [`Frame::fits`] first.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(HEADER_LEN + self.body.len());
        out.put_slice(&MAGIC);
        out.put_u8(self.kind);
        out.put_u32(u32::try_from(self.body.len()).unwrap_or(u32::MAX));
        out.put_slice(&self.body);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    pub fn fits(&self) -> bool {
        self.body.len() <= MAX_FRAME
    }
}

/// Checks a frame header; returns the type and the body length.
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), FrameError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
    if len as usize > MAX_FRAME {
        return Err(FrameError::TooLarge { len: len.into() });
    }
    Ok((h[4], len as usize))
}

/// An incremental decoder for frames arriving in arbitrary pieces (an HTTP/2 body).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// Appends bytes received. The buffer never holds more than one frame plus one piece: the
    /// caller takes frames with [`Decoder::next_frame`] after each push.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` when more bytes are needed, an error when the stream is
    /// not frames (the caller ends the stream).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            // Refuse a wrong magic as soon as its bytes are here.
            let n = self.buf.len().min(4);
            if self.buf[..n] != MAGIC[..n] {
                let mut magic = [0u8; 4];
                magic[..n].copy_from_slice(&self.buf[..n]);
                return Err(FrameError::Magic(magic));
            }
            return Ok(None);
        }
        let header: [u8; HEADER_LEN] = self.buf[..HEADER_LEN].try_into().expect("9 bytes");
        let (kind, len) = parse_header(&header)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let body = self.buf.split_to(len).freeze();
        Ok(Some(Frame { kind, body }))
    }

    /// Bytes held that are not yet a frame (the caller bounds it: at most a frame and a piece).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Reads exactly one frame from `io` (exact reads: nothing after it is consumed).
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match io.read(&mut header[got..]).await {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e.to_string())),
        }
        // A wrong magic is refused before the rest of the header is waited for.
        let n = got.min(4);
        if header[..n] != MAGIC[..n] {
            let mut magic = [0u8; 4];
            magic[..n].copy_from_slice(&header[..n]);
            return Err(FrameError::Magic(magic));
        }
    }
    let (kind, len) = parse_header(&header)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e.to_string()),
    })?;
    Ok(Frame {
        kind,
        body: body.into(),
    })
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, frame: &Frame) -> std::io::Result<()> {
    io.write_all(&frame.to_bytes()).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_in_any_pieces() {
        let frames = [
            Frame::new(1, &b"{\"client_id\":\"a\"}"[..]),
            Frame::new(4, Bytes::new()),
            Frame::new(8, vec![b'x'; MAX_FRAME]),
        ];
        let mut all = BytesMut::new();
        for f in &frames {
            f.encode(&mut all);
        }
        for piece in [1, 2, 7, 9, 100, all.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in all.chunks(piece) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "pieces of {piece}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn refuses_what_is_not_a_frame() {
        let cases: [(&[u8], FrameError); 4] = [
            (b"GET / HTTP/1.1\r\n", FrameError::Magic(*b"GET ")),
            (b"\x16\x03\x01", FrameError::Magic([0x16, 3, 1, 0])),
            (
                b"TNOX\x01\xff\xff\xff\xff",
                FrameError::TooLarge { len: 0xffff_ffff },
            ),
            (
                b"TNOX\x01\x00\x01\x00\x01",
                FrameError::TooLarge {
                    len: (MAX_FRAME + 1) as u64,
                },
            ),
        ];
        for (bytes, want) in cases {
            let mut d = Decoder::default();
            d.push(bytes);
            assert_eq!(d.next_frame(), Err(want), "{bytes:?}");
        }
    }

    #[tokio::test]
    async fn reads_one_frame_and_nothing_after_it() {
        let mut wire = Frame::new(2, &b"ok"[..]).to_bytes().to_vec();
        wire.extend_from_slice(b"PRI * HTTP/2.0");
        let mut io = &wire[..];
        let f = read_frame(&mut io).await.unwrap();
        assert_eq!(f, Frame::new(2, &b"ok"[..]));
        assert_eq!(io, b"PRI * HTTP/2.0");
        let cases: [(&[u8], FrameError); 4] = [
            (b"", FrameError::Closed),
            (b"TNOX\x01\x00", FrameError::Truncated),
            (b"TNOX\x01\x00\x00\x00\x05ab", FrameError::Truncated),
            (b"SSH-2.0-x", FrameError::Magic(*b"SSH-")),
        ];
        for (bytes, want) in cases {
            let mut io = bytes;
            assert_eq!(read_frame(&mut io).await, Err(want), "{bytes:?}");
        }
    }

    proptest! {
        // Garbage never panics, never buffers more than it was given, and a claimed length is
        // never allocated before its bytes arrive.
        #[test]
        fn garbage_is_refused_or_waited_for(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..64)) {
            let mut d = Decoder::default();
            let mut given = 0usize;
            for c in &chunks {
                given += c.len();
                d.push(c);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => prop_assert!(f.body.len() <= MAX_FRAME),
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
                prop_assert!(d.pending() <= given);
            }
        }

        #[test]
        fn any_frame_round_trips(kind in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..2048), split in 0usize..2100) {
            let f = Frame::new(kind, body);
            let bytes = f.to_bytes();
            let split = split.min(bytes.len());
            let mut d = Decoder::default();
            d.push(&bytes[..split]);
            let early = d.next_frame().unwrap();
            d.push(&bytes[split..]);
            let got = match early { Some(g) => g, None => d.next_frame().unwrap().unwrap() };
            prop_assert_eq!(got, f);
        }

        #[test]
        fn read_frame_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut io = &bytes[..];
            let _ = rt.block_on(read_frame(&mut io));
        }
    }
}
