//! UDP through a tunnel: one flow (one client address on a remote port) is one stream on the
//! session — a plain CONNECT carrying [`TRANSPORT_HEADER`] `udp` — on which each datagram
//! travels as a 2-byte big-endian length and its bytes, both ways. Both sides run [`pump`]
//! between the stream and their UDP socket until either side ends the stream or nothing
//! passes for the flow's idle time.

use std::future::Future;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// On a plain CONNECT stream: `udp` makes it a flow of datagrams (absent: a TCP byte stream).
pub const TRANSPORT_HEADER: HeaderName = HeaderName::from_static("tunnox-transport");

/// The largest datagram a flow carries (what the 2-byte length can say; more than UDP over
/// IPv4 can carry).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Appends one datagram, framed. A datagram over [`MAX_DATAGRAM`] cannot exist on a UDP socket;
/// it is cut to that length rather than framed wrongly.
pub fn encode(datagram: &[u8], out: &mut BytesMut) {
    let d = &datagram[..datagram.len().min(MAX_DATAGRAM)];
    out.reserve(2 + d.len());
    out.put_u16(d.len() as u16);
    out.put_slice(d);
}

/// Datagrams from the bytes of a stream as they arrive. Holds at most one partial datagram
/// plus what one read brought.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn next_datagram(&mut self) -> Option<Bytes> {
        if self.buf.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if self.buf.len() < 2 + len {
            return None;
        }
        self.buf.advance(2);
        Some(self.buf.split_to(len).freeze())
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// One side's UDP end of a flow.
pub trait Datagrams {
    /// The next datagram for the tunnel; `None` when this end is closed.
    fn recv(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
    /// Sends a datagram that came through the tunnel (a failure drops it, as UDP would).
    fn send(&mut self, datagram: Bytes) -> impl Future<Output = ()> + Send;
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The other side closed the stream (or it broke).
    Closed,
    /// This side's UDP end closed.
    Local,
    /// Nothing passed either way for the idle time.
    Idle,
}

/// Bytes carried: datagrams out of the tunnel (`from_tunnel`) and into it (`to_tunnel`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub from_tunnel: u64,
    pub to_tunnel: u64,
}

/// Moves datagrams between `stream` and `local` until one ends or `idle` passes with no
/// datagram either way; then ends the stream.
pub async fn pump<S, D>(stream: S, local: &mut D, idle: Duration) -> (End, Carried)
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Datagrams,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = BytesMut::new();
    let mut carried = Carried::default();
    let mut deadline = tokio::time::Instant::now() + idle;
    let end = loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break End::Closed,
                Ok(n) => {
                    decoder.push(&buf[..n]);
                    while let Some(d) = decoder.next_datagram() {
                        carried.from_tunnel += d.len() as u64;
                        local.send(d).await;
                    }
                    deadline = tokio::time::Instant::now() + idle;
                }
            },
            d = local.recv() => match d {
                None => break End::Local,
                Some(d) => {
                    out.clear();
                    encode(&d, &mut out);
                    if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                        break End::Closed;
                    }
                    carried.to_tunnel += d.len() as u64;
                    deadline = tokio::time::Instant::now() + idle;
                }
            },
            () = tokio::time::sleep_until(deadline) => break End::Idle,
        }
    };
    let _ = wr.shutdown().await;
    (end, carried)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_and_unframes_datagrams_split_anywhere() {
        let datagrams: Vec<Vec<u8>> = vec![vec![], b"a".to_vec(), vec![7; 1500], vec![9; 70_000]];
        let mut wire = BytesMut::new();
        for d in &datagrams {
            encode(d, &mut wire);
        }
        for chunk in [1, 2, 3, 1000, wire.len()] {
            let mut dec = Decoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.push(piece);
                while let Some(d) = dec.next_datagram() {
                    got.push(d.to_vec());
                }
            }
            assert_eq!(got.len(), 4, "chunk {chunk}");
            assert_eq!(got[..3], datagrams[..3], "chunk {chunk}");
            // An impossible datagram is cut to the most a UDP socket gives, never misframed.
            assert_eq!(got[3].len(), MAX_DATAGRAM);
            assert_eq!(dec.pending(), 0);
        }
    }

    proptest! {
        /// Garbage never panics, and the decoder never holds more than one frame plus one push.
        #[test]
        fn garbage_is_bounded(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4096), 0..64)) {
            let mut dec = Decoder::default();
            for c in &chunks {
                dec.push(c);
                while dec.next_datagram().is_some() {}
                prop_assert!(dec.pending() < 2 + MAX_DATAGRAM + 4096);
            }
        }
    }
}
