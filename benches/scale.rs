//! Scale benchmark (issue: scale): a single-node `tunnox proxy` with 100 000 mappings declared
//! in its configuration file and kept in its JSON file — the first start (an empty JSON file),
//! then restarts with the same mappings already in it: time from spawn to `/readyz`, and RSS
//! once ready. Prints a Markdown section on stdout (`make bench` collects it).

mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{Http, Listing, Proc, list_all, median, mib, ms, pinned, rss_of, wait_ready};
use support::process::free_port;

const MAPPINGS: usize = 100_000;
/// Restarts measured after the first start.
const RESTARTS: usize = 3;
const DOMAIN: &str = "bench.test";

/// The management API's token in this run.
const TOKEN: &str = "bench-admin-token-0123456789";
/// Items per page when listing every mapping through the API (its largest page).
const PAGE: usize = 500;

/// The proxy's configuration; with `declared`, the mappings are listed in it, otherwise they
/// are only in the JSON file (as mappings created through the management API are).
fn config(dir: &Path, port: u16, admin: u16, api: u16, declared: bool) -> std::path::PathBuf {
    let data = dir.join("tunnox-data.json");
    let mut yaml = format!(
        "storage: {{type: memory, hybrid: {{enable_persistent: true, json: {{file_path: \"{}\"}}}}}}\n\
         http_domain:\n  base_domains: [{DOMAIN}]\n\
         proxy:\n  listen: \"127.0.0.1:{port}\"\n  admin_listen: \"127.0.0.1:{admin}\"\n  worker_threads: 1\n\
         api: {{listen: \"127.0.0.1:{api}\", tokens: [{{token: {TOKEN}, role: admin}}]}}\n\
         log: {{level: warn}}\nmappings:\n",
        data.display()
    );
    for i in (0..MAPPINGS).filter(|_| declared) {
        yaml.push_str(&format!(
            "  - {{subdomain: h{i}, base_domain: {DOMAIN}, target_host: 127.0.0.1, target_port: 9}}\n"
        ));
    }
    let path = dir.join(if declared {
        "proxy.yaml"
    } else {
        "proxy-json-only.yaml"
    });
    std::fs::write(&path, yaml).unwrap();
    path
}

struct Start {
    ready: Duration,
    rss: u64,
    listing: Option<Listing>,
}

/// Starts the proxy, waits for `/readyz`, checks the last mapping is routed (a 502 from the
/// closed target port, not a 404), reads its RSS and stops it (SIGTERM: the JSON file is
/// complete).
fn start(
    dir: &Path,
    config: &Path,
    (port, admin, api): (u16, u16, u16),
    cpu: Option<usize>,
    n: usize,
    listing: bool,
) -> Start {
    let since = Instant::now();
    let mut cmd = pinned(cpu, env!("CARGO_BIN_EXE_tunnox"));
    cmd.arg("-c")
        .arg(config)
        .arg("proxy")
        .env_remove("RUST_LOG");
    let mut p = Proc::spawn(
        "tunnox proxy",
        &mut cmd,
        &dir.join(format!("proxy-{n}.log")),
        true,
    );
    let ready = wait_ready(&mut p, admin, since, Duration::from_secs(120));
    let last = format!("h{}.{DOMAIN}", MAPPINGS - 1);
    let a = Http::new(port).get(&last, "/").expect("a response");
    assert_eq!(a.status, 502, "{last} is routed (to a closed port)");
    let rss = rss_of(&p.pid().to_string());
    let listing = listing.then(|| list_all(api, &p.pid().to_string(), TOKEN, PAGE));
    p.stop();
    Start {
        ready,
        rss,
        listing,
    }
}

/// The restarts' times as text, and the medians of their ready time and RSS.
fn summary(starts: &[Start]) -> (String, u64, Duration) {
    let secs: Vec<f64> = starts.iter().map(|s| s.ready.as_secs_f64()).collect();
    let rss: Vec<f64> = starts.iter().map(|s| s.rss as f64).collect();
    let text = secs
        .iter()
        .map(|s| format!("{s:.2} s"))
        .collect::<Vec<_>>()
        .join(" / ");
    (
        text,
        median(&rss) as u64,
        Duration::from_secs_f64(median(&secs)),
    )
}

fn main() {
    let started = Instant::now();
    let (serve_cpu, _) = harness::cpus();
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = (free_port(), free_port(), free_port());
    let declared = config(dir.path(), ports.0, ports.1, ports.2, true);
    let first = start(dir.path(), &declared, ports, serve_cpu, 0, false);
    let file = std::fs::metadata(dir.path().join("tunnox-data.json")).map_or(0, |m| m.len());
    let restarts: Vec<Start> = (1..=RESTARTS)
        .map(|n| start(dir.path(), &declared, ports, serve_cpu, n, n == RESTARTS))
        .collect();
    // The same JSON file, a configuration that does not list the mappings.
    let json_only = config(dir.path(), ports.0, ports.1, ports.2, false);
    let from_json: Vec<Start> = (1..=RESTARTS)
        .map(|n| start(dir.path(), &json_only, ports, serve_cpu, 10 + n, false))
        .collect();
    let (secs, rss, restart) = summary(&restarts);
    let (json_secs, json_rss, json_restart) = summary(&from_json);
    let cpu = match serve_cpu {
        Some(c) => format!("on core {c} (`taskset`)"),
        None => "unpinned (one core)".into(),
    };
    println!("## Scale (issue: scale)\n");
    println!(
        "A single-node `tunnox proxy` ({cpu}, `worker_threads: 1`) with {MAPPINGS} mappings declared \
         in its configuration file and kept in its JSON file (`storage.hybrid`, {} once written). The \
         first start finds the JSON file empty and creates every mapping; each restart finds them all \
         there already and changes nothing. Then the same JSON file with a configuration that does not \
         list them (mappings created through the management API live only there). Time from spawn to \
         `/readyz` 200; RSS once ready; the last mapping is checked to be routed each time. Restarts \
         ×{RESTARTS}, median. The run took {:.0} s.\n",
        mib(file),
        started.elapsed().as_secs_f64()
    );
    println!("| start | ready after | RSS |");
    println!("|---|---|---|");
    println!(
        "| first (empty JSON file) | {} | {} |",
        ms(first.ready),
        mib(first.rss)
    );
    println!(
        "| restart (the same {MAPPINGS} declared in the configuration and in the JSON file) | **{}** ({}) | {} |",
        ms(restart),
        secs,
        mib(rss)
    );
    println!(
        "| restart (the {MAPPINGS} only in the JSON file) | **{}** ({}) | {} |",
        ms(json_restart),
        json_secs,
        mib(json_rss)
    );
    println!();
    println!(
        "Goal (issue: scale): a restart with the same 100 000 mappings in its JSON file ready in under 1 s: \
         **{}** (also declared in the configuration: **{}**); RSS under 40 MB: **{}** (**{}**).\n",
        harness::goal(json_restart < Duration::from_secs(1)),
        harness::goal(restart < Duration::from_secs(1)),
        harness::goal((json_rss as f64) < 40e6),
        harness::goal((rss as f64) < 40e6)
    );
    let listed = restarts
        .iter()
        .find_map(|s| s.listing.as_ref())
        .expect("the last restart listed");
    let mut pages = listed.pages.clone();
    pages.sort();
    let p99 = harness::pct(&pages, 0.99);
    let growth = listed.rss_max.saturating_sub(listed.rss_before);
    println!("### Listing through the management API\n");
    println!(
        "The same proxy after its last restart, `api.listen` with an admin token: `GET /api/v1/mappings?limit={PAGE}` \
         following `next_cursor` until the last page, one kept-alive connection, each page timed from sending the request \
         to the last byte of its JSON; the proxy's RSS read after every page.\n"
    );
    println!(
        "| mappings listed | pages | page p50 | page p99 | page max | RSS before | RSS growth (most, after any page) |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | **{}** | {} | {} | **{}** |",
        listed.items,
        pages.len(),
        ms(harness::pct(&pages, 0.5)),
        ms(p99),
        ms(*pages.last().expect("a page")),
        mib(listed.rss_before),
        mib(growth)
    );
    println!();
    println!(
        "Goals (issue: management API): every mapping listed: **{}**; each page under 50 ms at p99: **{}**; RSS growth under 20 MB: **{}**.\n",
        harness::goal(listed.items == MAPPINGS),
        harness::goal(p99 < Duration::from_millis(50)),
        harness::goal(growth < 20_000_000)
    );
}
