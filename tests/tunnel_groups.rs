//! Load-balancing groups (single-node): two tunnel clients, each behind its own real `tunnox
//! agent`, publish a service in one group on one remote port. Each service answers a connection
//! with its letter, so the test sees which member carried it: round robin alternates, least
//! connections fills the emptier member, a stopped agent leaves the rotation within the
//! heartbeat window (1 s here: two misses) and a started one rejoins.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::process::{Role, eventually, free_port};
use support::proxy::ProxyProc;
use support::tunnel::{AgentSpec, Pki, agent, secret_file};

/// A service that writes `letter` to each connection, then waits for the client to close.
fn lettered(letter: u8) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.write_all(&[letter]);
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                let _ = s.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

/// An HTTP service: `GET /health` answers 200 while `up`, 503 otherwise; any other request
/// answers with `letter` as its body. One request per connection.
fn http_service(letter: u8, up: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let up = up.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && matches!(s.read(&mut b), Ok(1)) {
                    head.push(b[0]);
                }
                let health = head.starts_with(b"GET /health ");
                let (status, body) = match (health, up.load(Ordering::Relaxed)) {
                    (true, true) => ("200 OK", "ok".to_string()),
                    (true, false) => ("503 Service Unavailable", "down".to_string()),
                    (false, _) => ("200 OK", (letter as char).to_string()),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// The body of `GET /` through `port`: the member's letter, `-` when nobody answered.
fn fetch(port: u16) -> char {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return '-';
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return '-';
    }
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    match all.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) if all.len() > i + 4 => all[i + 4] as char,
        _ => '-',
    }
}

struct Group {
    dir: tempfile::TempDir,
    pki: Pki,
    _proxy: ProxyProc,
    tunnel: u16,
    services: [u16; 2],
    /// HTTP services of the members, whose `/health` follows `up`.
    http: [u16; 2],
    up: [Arc<AtomicBool>; 2],
    /// The round-robin group's port, the least-connections group's, and the health-checked one's.
    rr: u16,
    lc: u16,
    hc: u16,
}

impl Group {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "groups");
        let node_token = secret_file(dir.path(), "node-token", "node-secret-0123456789");
        let services = [lettered(b'A'), lettered(b'B')];
        let up = [(); 2].map(|()| Arc::new(AtomicBool::new(true)));
        let http = [
            http_service(b'A', up[0].clone()),
            http_service(b'B', up[1].clone()),
        ];
        let (rr, lc, hc, tunnel) = (free_port(), free_port(), free_port(), free_port());
        let client = |id: &str, service: u16, http: u16| {
            format!(
                "  - client_id: {id}
    token: {id}-secret-0123456789
    tunnels:
      - {{name: web, local_host: 127.0.0.1, local_port: {service}, remote_port: {rr}, group: web}}
      - {{name: busy, local_host: 127.0.0.1, local_port: {service}, remote_port: {lc}, group: busy, balance: least_connections}}
      - {{name: checked, local_host: 127.0.0.1, local_port: {http}, remote_port: {hc}, group: checked, health_check: {{type: http, path: /health, interval: 1s, timeout: 500ms, max_failed: 1}}}}
"
            )
        };
        let config = format!(
            "storage: {{type: memory}}\nhttp_domain: {{base_domains: [tunnox.net]}}\ntunnel_clients:\n{}{}",
            client("a", services[0], http[0]),
            client("b", services[1], http[1])
        );
        let proxy = ProxyProc::start(
            dir.path(),
            "p",
            &config,
            &pki.tunnel_yaml(tunnel, &node_token),
        )
        .ready();
        Self {
            dir,
            pki,
            _proxy: proxy,
            tunnel,
            services,
            http,
            up,
            rr,
            lc,
            hc,
        }
    }

    /// The agent of client `a` (member 0) or `b` (member 1).
    fn agent(&self, member: usize) -> Role {
        let id = ["a", "b"][member];
        let token = secret_file(
            self.dir.path(),
            &format!("{id}-token"),
            &format!("{id}-secret-0123456789"),
        );
        agent(
            self.dir.path(),
            &format!("agent-{id}"),
            &AgentSpec {
                client_id: id,
                token_file: &token,
                ca: &self.pki.ca,
                servers: &[self.tunnel],
                allow: &[
                    format!("127.0.0.1:{}", self.services[member]),
                    format!("127.0.0.1:{}", self.http[member]),
                ],
                extra: &[],
            },
        )
    }
}

/// Connects to `port` and reads the member's letter; the connection stays open while the
/// stream is kept. `None` when nobody answered.
fn open(port: u16) -> Option<(u8, TcpStream)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut letter = [0u8; 1];
    s.read_exact(&mut letter).ok()?;
    Some((letter[0], s))
}

/// The letters of `n` connections opened one after another, each closed before the next.
fn letters(port: u16, n: usize) -> String {
    (0..n)
        .map(|_| open(port).map_or('-', |(l, _)| l as char))
        .collect()
}

#[test]
fn a_group_balances_fails_over_and_rejoins() {
    let g = Group::start();
    let _a = g.agent(0);
    let mut b = g.agent(1);
    eventually("both members carry", Duration::from_secs(15), || {
        let seen = letters(g.rr, 4);
        seen.contains('A') && seen.contains('B')
    });

    // Round robin: connections alternate.
    let seq = letters(g.rr, 8);
    println!("round robin: {seq}");
    assert!(
        seq.as_bytes().windows(2).all(|w| w[0] != w[1]) && !seq.contains('-'),
        "round robin alternates: {seq}"
    );

    // Least connections: four held connections spread two and two; once A's two close, the
    // next two both go to A (round robin would send one to B).
    let held: Vec<(u8, TcpStream)> = (0..4).map(|_| open(g.lc).unwrap()).collect();
    let on = |l: u8| held.iter().filter(|(x, _)| *x == l).count();
    assert_eq!(
        (on(b'A'), on(b'B')),
        (2, 2),
        "least connections spreads evenly"
    );
    let (mut on_a, on_b): (Vec<_>, Vec<_>) = held.into_iter().partition(|(l, _)| *l == b'A');
    on_a.clear();
    // A's connections end through the agent before the proxy counts them closed.
    std::thread::sleep(Duration::from_millis(500));
    let next: String = (0..2)
        .map(|_| open(g.lc).unwrap())
        .map(|(l, s)| {
            on_a.push((l, s));
            l as char
        })
        .collect();
    assert_eq!(next, "AA", "least connections goes to the emptier member");
    drop(on_a);
    drop(on_b);

    // Stop B: every connection goes to A at once (its session leaves).
    assert_eq!(b.terminate(Duration::from_secs(10)), Some(0));
    let seq = letters(g.rr, 6);
    assert_eq!(seq, "AAAAAA", "a stopped member leaves the rotation");

    // B back: it rejoins and connections alternate again.
    let mut b = g.agent(1);
    let rejoined = eventually("B rejoins", Duration::from_secs(15), || {
        letters(g.rr, 2).contains('B')
    });
    let seq = letters(g.rr, 6);
    println!("rejoined after {rejoined:?}: {seq}");
    assert!(
        seq.as_bytes().windows(2).all(|w| w[0] != w[1]),
        "alternating again: {seq}"
    );

    // Killed without a word (SIGKILL): it leaves the rotation within the heartbeat window
    // (two missed 1 s heartbeats); connections meanwhile wait for it to be declared dead,
    // then go to A — none is lost.
    b.kill();
    let started = Instant::now();
    let seq = letters(g.rr, 6);
    let took = started.elapsed();
    println!("after SIGKILL: {seq} in {took:?}");
    assert_eq!(
        seq, "AAAAAA",
        "no connection lost while the dead member leaves"
    );
    assert!(
        took < Duration::from_secs(6),
        "within the heartbeat window: {took:?}"
    );
}

/// Health checks (`health_check: {type: http, path: /health, interval: 1s, max_failed: 1}`):
/// the agents probe their services; while B's `/health` answers 503, B's agent reports it down
/// and every connection goes to A, though B's agent and its service are up; once it answers
/// 200 again B is back in the rotation.
#[test]
fn a_member_whose_health_check_fails_leaves_the_rotation_until_it_passes() {
    let g = Group::start();
    let _a = g.agent(0);
    let _b = g.agent(1);
    let both = |n: usize| -> String { (0..n).map(|_| fetch(g.hc)).collect() };
    eventually("both members serve", Duration::from_secs(15), || {
        let s = both(4);
        s.contains('A') && s.contains('B')
    });
    g.up[1].store(false, Ordering::Relaxed);
    let left = eventually("B leaves the rotation", Duration::from_secs(5), || {
        both(4) == "AAAA"
    });
    let seq = both(6);
    println!("B's check failing: {seq} (out after {left:?})");
    assert_eq!(seq, "AAAAAA", "an unhealthy member takes no connection");
    g.up[1].store(true, Ordering::Relaxed);
    let back = eventually("B back", Duration::from_secs(5), || both(4).contains('B'));
    let seq = both(6);
    println!("B's check passing again after {back:?}: {seq}");
    assert!(seq.as_bytes().windows(2).all(|w| w[0] != w[1]), "{seq}");
}

/// An HTTP service that answers every request 200; `/slow` after 1.5 s.
fn http_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && matches!(s.read(&mut b), Ok(1)) {
                    head.push(b[0]);
                }
                if head.starts_with(b"GET /slow ") {
                    std::thread::sleep(Duration::from_millis(1500));
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

/// How many requests the agent whose admin server is on `admin` forwarded successfully.
fn served(admin: u16) -> u64 {
    support::process::metric(admin, "tunnox_agent_streams_total{outcome=\"ok\"}")
}

/// `HTTPDomainMapping.spec.target.tunnel.group` in single-node form (`target_group`): one
/// domain served by every client listing the group. Each agent counts the requests it
/// forwarded (its `/metrics`), so the test sees who carried each one: round robin alternates,
/// least connections avoids the member busy with a slow request, a stopped member leaves the
/// rotation at once and a started one rejoins.
#[test]
fn an_http_mapping_to_a_group_balances_fails_over_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "groups");
    let node_token = secret_file(dir.path(), "node-token", "node-secret-0123456789");
    let upstream = http_upstream();
    let tunnel = free_port();
    let config = format!(
        "storage: {{type: memory}}
http_domain: {{base_domains: [tunnox.net]}}
tunnel_clients:
  - {{client_id: a, token: a-secret-0123456789, groups: [site]}}
  - {{client_id: b, token: b-secret-0123456789, groups: [site]}}
mappings:
  - {{subdomain: rr, base_domain: tunnox.net, target_group: site, target_host: 127.0.0.1, target_port: {upstream}}}
  - {{subdomain: lc, base_domain: tunnox.net, target_group: site, balance: least_connections, target_host: 127.0.0.1, target_port: {upstream}}}
"
    );
    let proxy = ProxyProc::start(
        dir.path(),
        "p",
        &config,
        &pki.tunnel_yaml(tunnel, &node_token),
    )
    .ready();
    let admins = [free_port(), free_port()];
    let start = |member: usize| {
        let id = ["a", "b"][member];
        let token = secret_file(
            dir.path(),
            &format!("{id}-token"),
            &format!("{id}-secret-0123456789"),
        );
        let admin = format!("127.0.0.1:{}", admins[member]);
        agent(
            dir.path(),
            &format!("agent-{id}"),
            &AgentSpec {
                client_id: id,
                token_file: &token,
                ca: &pki.ca,
                servers: &[tunnel],
                allow: &[format!("127.0.0.1:{upstream}")],
                extra: &["--admin-listen", &admin],
            },
        )
    };
    let get =
        |host: &str, path: &str| support::http::get(proxy.port, host, path).map_or(0, |r| r.status);
    // (requests forwarded by a, by b)
    let counts = || (served(admins[0]), served(admins[1]));

    // No member connected: 502 naming nobody's address.
    assert_eq!(get("rr.tunnox.net", "/"), 502);
    let _a = start(0);
    let mut b = start(1);
    eventually("both members serve", Duration::from_secs(15), || {
        let before = counts();
        let ok = (0..4).all(|_| get("rr.tunnox.net", "/") == 200);
        let after = counts();
        ok && after.0 > before.0 && after.1 > before.1
    });

    // Round robin: ten requests, five each.
    let before = counts();
    for _ in 0..10 {
        assert_eq!(get("rr.tunnox.net", "/"), 200);
    }
    let after = counts();
    println!(
        "round robin: a {} b {}",
        after.0 - before.0,
        after.1 - before.1
    );
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (5, 5),
        "round robin alternates"
    );

    // Least connections: while one member carries a slow request, quick ones go to the other.
    let before = counts();
    let slow = std::thread::spawn({
        let port = proxy.port;
        move || support::http::get(port, "lc.tunnox.net", "/slow").map_or(0, |r| r.status)
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        assert_eq!(get("lc.tunnox.net", "/"), 200);
    }
    let quick = counts();
    assert_eq!(slow.join().unwrap(), 200);
    let after = counts();
    let quick = (quick.0 - before.0, quick.1 - before.1);
    let slow_on = (after.0 - before.0 - quick.0, after.1 - before.1 - quick.1);
    println!("least connections: quick {quick:?}, slow {slow_on:?}");
    assert!(
        (quick == (4, 0) && slow_on == (0, 1)) || (quick == (0, 4) && slow_on == (1, 0)),
        "the quick requests avoid the busy member: quick {quick:?}, slow {slow_on:?}"
    );

    // Stop b: every request goes to a, none fails.
    assert_eq!(b.terminate(Duration::from_secs(10)), Some(0));
    let before = counts();
    for _ in 0..6 {
        assert_eq!(
            get("rr.tunnox.net", "/"),
            200,
            "a stopped member is skipped"
        );
    }
    assert_eq!(counts().0 - before.0, 6);

    // b back: it rejoins.
    b = start(1);
    let rejoined = eventually("b rejoins", Duration::from_secs(15), || {
        let before = counts().1;
        (0..2).all(|_| get("rr.tunnox.net", "/") == 200) && counts().1 > before
    });
    println!("b rejoined after {rejoined:?}");

    // Killed without a word: requests keep succeeding (a serves them) while its session is
    // declared dead within the heartbeat window.
    b.kill();
    let started = Instant::now();
    for _ in 0..6 {
        assert_eq!(
            get("rr.tunnox.net", "/"),
            200,
            "no request lost to the dead member"
        );
    }
    println!("after SIGKILL: 6 requests in {:?}", started.elapsed());

    let metrics = proxy.admin_get("/metrics").unwrap().body;
    assert!(
        metrics.contains("tunnox_tunnel_group_members_total{outcome=\"chosen\"}"),
        "{metrics}"
    );
}
