//! Echo services on loopback for tunnel tests: what a client sends comes back.

use std::io::Write as _;
use std::net::{Shutdown, TcpListener, UdpSocket};

/// A TCP echo service: each connection's bytes come back until the client half-closes, then it
/// closes its side. Returns its port.
pub fn tcp() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.flush();
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// A UDP echo service: every datagram goes back to its sender. Returns its port.
pub fn udp() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    port
}
