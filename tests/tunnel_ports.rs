//! TCP and UDP tunnels on remote ports (single-node): the real `tunnox proxy` with
//! `tunnel_clients[].tunnels`, the real `tunnox agent` over TLS 1.3, and TCP and UDP echo
//! services on loopback. Each TCP connection and each UDP flow to a remote port is one stream
//! on the agent's session.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use support::process::{Role, eventually, free_port, http_get};
use support::proxy::ProxyProc;
use support::tunnel::{AgentSpec, Pki, agent, secret_file};

struct Node {
    dir: tempfile::TempDir,
    pki: Pki,
    token: std::path::PathBuf,
    proxy: ProxyProc,
    /// The proxy's tunnel listener.
    tunnel: u16,
    echo: u16,
    udp_echo: u16,
    /// The UDP remote ports (to the UDP echo): flows idle after 1 s; at most 2 flows.
    udp: u16,
    udp_two: u16,
    /// Remote ports: `ssh` (echo, unlimited), `two` (echo, max 2 connections), `denied` (a
    /// target the agent does not allow), `nobody` (a client with no agent).
    ssh: u16,
    two: u16,
    denied: u16,
    nobody: u16,
    /// Echo limited to [`LIMIT`] bytes per second.
    slow: u16,
}

/// `max_bytes_per_second` of the `slow` tunnel: 1 MiB/s.
const LIMIT: u64 = 1 << 20;

fn config(echo: u16, udp_echo: u16, ports: [u16; 7]) -> String {
    let [ssh, two, denied, nobody, udp, udp_two, slow] = ports;
    format!(
        "storage: {{type: memory}}
http_domain: {{base_domains: [tunnox.net]}}
tunnel_clients:
  - client_id: laptop
    token: agent-secret-0123456789
    tunnels:
      - {{name: ssh, local_host: 127.0.0.1, local_port: {echo}, remote_port: {ssh}}}
      - {{name: two, type: tcp, local_host: 127.0.0.1, local_port: {echo}, remote_port: {two}, max_connections: 2}}
      - {{name: denied, local_host: 127.0.0.1, local_port: 1, remote_port: {denied}}}
      - {{name: dns, type: udp, local_host: 127.0.0.1, local_port: {udp_echo}, remote_port: {udp}, udp_session_timeout: 1s}}
      - {{name: dns-two, type: udp, local_host: 127.0.0.1, local_port: {udp_echo}, remote_port: {udp_two}, max_connections: 2}}
      - {{name: slow, local_host: 127.0.0.1, local_port: {echo}, remote_port: {slow}, max_bytes_per_second: {LIMIT}}}
  - client_id: nobody
    token: other-secret-0123456789
    tunnels:
      - {{name: db, local_host: localhost, local_port: 5432, remote_port: {nobody}}}"
    )
}

impl Node {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "tcp");
        let token = secret_file(dir.path(), "agent-token", "agent-secret-0123456789");
        let node_token = secret_file(dir.path(), "node-token", "node-secret-0123456789");
        let echo = support::echo::tcp();
        let udp_echo = support::echo::udp();
        let ports = [(); 7].map(|()| free_port());
        let tunnel = free_port();
        let proxy = ProxyProc::start(
            dir.path(),
            "p",
            &config(echo, udp_echo, ports),
            &pki.tunnel_yaml(tunnel, &node_token),
        )
        .ready();
        let [ssh, two, denied, nobody, udp, udp_two, slow] = ports;
        Self {
            dir,
            pki,
            token,
            proxy,
            tunnel,
            echo,
            udp_echo,
            udp,
            udp_two,
            ssh,
            two,
            denied,
            nobody,
            slow,
        }
    }

    fn agent(&self) -> Role {
        self.agent_with(&[])
    }

    fn agent_with(&self, extra: &[&str]) -> Role {
        let a = agent(
            self.dir.path(),
            "agent",
            &AgentSpec {
                client_id: "laptop",
                token_file: &self.token,
                ca: &self.pki.ca,
                servers: &[self.tunnel],
                allow: &[
                    format!("127.0.0.1:{}", self.echo),
                    format!("127.0.0.1:{}", self.udp_echo),
                ],
                extra,
            },
        );
        eventually(
            "agent carries a connection",
            Duration::from_secs(15),
            || round_trip(self.ssh, b"ping").as_deref() == Some(&b"ping"[..]),
        );
        a
    }

    fn metric(&self, outcome: &str) -> u64 {
        let body = self.proxy.admin_get("/metrics").unwrap().body;
        let prefix = format!("tunnox_tunnel_remote_connections_total{{outcome=\"{outcome}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `data`, half-closes, and reads until the other side closes; `None` on an error.
fn round_trip(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(data).ok()?;
    s.shutdown(Shutdown::Write).ok()?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).ok()?;
    Some(back)
}

/// True when the proxy closed the connection without carrying anything.
fn closed_at_once(port: u16) -> bool {
    let mut s = connect(port);
    let _ = s.write_all(b"hello");
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

/// Deterministic bytes for connection `i`.
fn payload(i: usize, len: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn fifty_connections_carry_a_megabyte_each_way_intact() {
    let n = Node::start();
    let _agent = n.agent();
    let started = Instant::now();
    let workers: Vec<_> = (0..50)
        .map(|i| {
            let port = n.ssh;
            std::thread::spawn(move || {
                let data = payload(i, 1 << 20);
                let s = connect(port);
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::with_capacity(data.len());
                let mut r = s;
                r.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                assert!(back == data, "connection {i}: {} bytes back", back.len());
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    eprintln!("50 x 1 MiB each way in {:?}", started.elapsed());
    // One warm-up round trip plus the fifty.
    assert_eq!(n.metric("ok"), 51, "{}", n.proxy.log());
    // Every connection ended on both sides: none is still carried, and their bytes are counted.
    let gauge = |name: &str| {
        let body = n.proxy.admin_get("/metrics").unwrap().body;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    };
    eventually("no connection left open", Duration::from_secs(5), || {
        gauge("tunnox_tunnel_remote_connections_open") == 0
    });
    assert_eq!(
        gauge("tunnox_tunnel_remote_bytes_total{direction=\"in\"}"),
        50 * (1 << 20) + 4
    );
}

#[test]
fn limits_refusals_and_a_port_that_cannot_be_bound() {
    let n = Node::start();
    // No agent yet: the client is offline and connections are closed at once.
    assert!(closed_at_once(n.ssh));
    assert!(n.metric("offline") >= 1);
    let _agent = n.agent();

    // max_connections: 2 → the third is refused while two are open; one closing frees a place.
    let mut a = connect(n.two);
    let mut b = connect(n.two);
    for s in [&mut a, &mut b] {
        s.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
    }
    assert!(closed_at_once(n.two));
    assert_eq!(n.metric("max_connections"), 1);
    drop(a);
    eventually("a place frees up", Duration::from_secs(5), || {
        round_trip(n.two, b"again").as_deref() == Some(&b"again"[..])
    });
    drop(b);

    // A target outside the agent's allow list, and a client with no agent.
    assert!(closed_at_once(n.denied));
    assert!(n.metric("agent_error") >= 1);
    assert!(closed_at_once(n.nobody));
    assert!(n.metric("offline") >= 2);
    // The proxy is still healthy and still carries connections.
    assert_eq!(round_trip(n.ssh, b"still").as_deref(), Some(&b"still"[..]));

    // A second proxy whose remote port is taken does not start, and says which field.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    let yaml = config(
        n.echo,
        n.udp_echo,
        [
            taken,
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        ],
    );
    let node_token = secret_file(n.dir.path(), "node-token-2", "node-secret-0123456789");
    let mut second = ProxyProc::start(
        n.dir.path(),
        "second",
        &yaml,
        &n.pki.tunnel_yaml(free_port(), &node_token),
    );
    eventually("the second proxy exits", Duration::from_secs(10), || {
        !second.role.is_running()
    });
    let log = second.log();
    assert!(
        log.contains("tunnel_clients[0].tunnels[0].remote_port")
            && log.contains(&taken.to_string()),
        "{log}"
    );
}

/// Sends `data` from `s` to the remote port and waits for its echo (UDP may drop: a few tries).
fn udp_round_trip(s: &UdpSocket, port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..5 {
        s.send_to(data, ("127.0.0.1", port)).ok()?;
        if let Ok(n) = s.recv(&mut buf) {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

#[test]
fn udp_flows_carry_datagrams_and_close_when_idle() {
    let n = Node::start();
    let _agent = n.agent();
    let clients: Vec<UdpSocket> = (0..2)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
        .collect();
    // Two flows (two client addresses), datagrams of many sizes, each echoed to its own sender.
    for (c, s) in clients.iter().enumerate() {
        for i in 0..100 {
            let d = payload(c * 1000 + i, 1 + (i * 97) % 1400);
            assert_eq!(
                udp_round_trip(s, n.udp, &d),
                Some(d),
                "flow {c}, datagram {i}"
            );
        }
    }
    // One large datagram (beyond one HTTP/2 frame) arrives whole.
    let big = payload(7, 60_000);
    assert_eq!(udp_round_trip(&clients[0], n.udp, &big), Some(big));
    assert_eq!(
        n.metric("ok"),
        3,
        "one warm-up TCP connection + two UDP flows"
    );

    // Idle past udp_session_timeout (1 s): both flows are closed; a new datagram opens a new one.
    eventually("idle flows closed", Duration::from_secs(5), || {
        n.metric("udp_idle_closed") == 2
    });
    assert_eq!(
        udp_round_trip(&clients[1], n.udp, b"back again").as_deref(),
        Some(&b"back again"[..])
    );
    assert_eq!(n.metric("ok"), 4);

    // At most 2 flows: a third client address gets nothing back, and is counted.
    let three: Vec<UdpSocket> = (0..3)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            s
        })
        .collect();
    for s in &three[..2] {
        assert_eq!(
            udp_round_trip(s, n.udp_two, b"in").as_deref(),
            Some(&b"in"[..])
        );
    }
    assert_eq!(udp_round_trip(&three[2], n.udp_two, b"over"), None);
    assert!(n.metric("max_connections") >= 1);
}

/// `max_bytes_per_second` on the `slow` tunnel (1 MiB/s, both directions and all connections
/// together): two connections writing as fast as they can to the echo behind it get 1 MiB/s
/// between them, within 10% over 10 s. The unlimited `ssh` tunnel beside it is not slowed.
#[test]
fn a_bandwidth_limit_holds_within_ten_percent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let n = Node::start();
    let _agent = n.agent();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..2 {
        let s = connect(n.slow);
        let mut w = s.try_clone().unwrap();
        let stop_w = stop.clone();
        threads.push(std::thread::spawn(move || {
            let chunk = vec![7u8; 16 * 1024];
            while !stop_w.load(Ordering::Relaxed) {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = w.shutdown(Shutdown::Write);
        }));
        let mut r = s;
        let got = received.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k) = r.read(&mut buf) {
                if k == 0 {
                    break;
                }
                got.fetch_add(k as u64, Ordering::Relaxed);
            }
        }));
    }
    // The bucket's first burst passes; then the rate is measured over 10 s.
    std::thread::sleep(Duration::from_secs(1));
    let (t0, r0) = (Instant::now(), received.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(10));
    let (dt, r1) = (t0.elapsed(), received.load(Ordering::Relaxed));
    // Every echoed byte passed the limit twice: in towards the service, out back.
    let rate = 2.0 * (r1 - r0) as f64 / dt.as_secs_f64();
    println!("limited to {LIMIT} B/s: carried {rate:.0} B/s over {dt:?}");
    let ratio = rate / LIMIT as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "1 MiB/s limit: carried {rate:.0} B/s ({ratio:.3}x)"
    );
    // Unlimited beside it: 8 MiB round trip well above the limit's pace.
    let big = payload(1, 8 << 20);
    let start = Instant::now();
    assert_eq!(round_trip(n.ssh, &big).as_deref(), Some(&big[..]));
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "the unlimited tunnel took {:?} for 16 MiB",
        start.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    drop(threads);
    let shaped = n.proxy.admin_get("/metrics").unwrap().body;
    assert!(shaped.contains("tunnox_tunnel_remote_shaped_bytes_total"));
}

/// Configuration push (single-node): at connect the proxy sends the agent its client's tunnels
/// and their hash; the agent refuses the one its allow list does not hold (`denied`), answers
/// with the hash, keeps the configuration in its cache file, and reads it back when it starts
/// again while no server is reachable.
#[test]
fn the_agent_is_pushed_its_tunnels_and_keeps_them_on_disk() {
    let n = Node::start();
    let cache = n.dir.path().join("agent-config.json");
    let cache_arg = cache.display().to_string();
    let admin = free_port();
    let admin_arg = format!("127.0.0.1:{admin}");
    let mut a = n.agent_with(&["--config-cache", &cache_arg, "--admin-listen", &admin_arg]);
    eventually(
        "the configuration cache is written",
        Duration::from_secs(10),
        || cache.exists(),
    );
    let cached: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap();
    assert_eq!(cached["client_id"], "laptop");
    let names: Vec<&str> = cached["config"]["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["denied", "dns", "dns-two", "slow", "ssh", "two"]);
    let hash = cached["config"]["hash"].as_str().unwrap().to_string();
    assert!(hash.starts_with("sha256:"), "{hash}");
    let metrics = http_get(admin, "/metrics");
    for line in [
        "tunnox_agent_config_tunnels{state=\"rejected\"} 1",
        "tunnox_agent_config_tunnels{state=\"carried\"} 5",
        "tunnox_agent_config_pushes_total{outcome=\"applied\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The proxy heard the answer and names the refused tunnel.
    eventually("the proxy logs the refusal", Duration::from_secs(5), || {
        let log = n.proxy.log();
        log.contains("agent refuses a tunnel") && log.contains("denied")
    });
    let proxy_metrics = n.proxy.admin_get("/metrics").unwrap().body;
    assert!(
        proxy_metrics.contains(
            "tunnox_tunnel_session_events_total{outcome=\"config_rejected\",reason=\"\"} 1"
        ),
        "{proxy_metrics}"
    );
    assert_eq!(a.terminate(Duration::from_secs(10)), Some(0));

    // Started again with no server to reach: the last configuration is read from the cache.
    let unreachable = free_port();
    let again = agent(
        n.dir.path(),
        "agent-offline",
        &AgentSpec {
            client_id: "laptop",
            token_file: &n.token,
            ca: &n.pki.ca,
            servers: &[unreachable],
            allow: &[format!("127.0.0.1:{}", n.echo)],
            extra: &["--config-cache", &cache_arg],
        },
    );
    eventually(
        "the cache is read at start",
        Duration::from_secs(10),
        || {
            let log = again.log();
            log.contains("last configuration read from the cache") && log.contains(&hash)
        },
    );
}

/// One connection whose client stops reading must not stall the others on the same agent
/// session: its stream may hold at most its own window of the session, not all of it (with
/// adaptive HTTP/2 windows one stream could take the whole connection window, and every other
/// stream then waited).
#[test]
fn a_client_that_stops_reading_does_not_stall_the_session() {
    let n = Node::start();
    let _agent = n.agent();
    // Four connections push 16 MiB each to the echo and never read what comes back.
    let stalled: Vec<std::thread::JoinHandle<()>> = (0..4)
        .map(|_| {
            let mut s = connect(n.ssh);
            std::thread::spawn(move || {
                let chunk = vec![1u8; 64 * 1024];
                for _ in 0..256 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_secs(20));
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let big = payload(2, 4 << 20);
    let start = Instant::now();
    let back = round_trip(n.ssh, &big);
    let took = start.elapsed();
    assert!(
        back.as_deref() == Some(&big[..]),
        "4 MiB round trip beside four stalled connections: {} bytes back after {took:?}",
        back.map_or(0, |b| b.len())
    );
    println!("4 MiB round trip beside four stalled connections: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the session stalled: {took:?}"
    );
    drop(stalled);
}
