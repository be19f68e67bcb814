//! Store benchmarks against a real `redis-server` started for the run (its own process):
//! create latency, lookup-by-domain latency and the 10-way contested claim, each beside the
//! bare Redis round trip measured with the same client in the same run, and the memory store.
//!
//! Prints a Markdown section on stdout (`make bench` collects it into docs/benchmarks.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tunnox::domain::{Hostname, MappingSpec};
use tunnox::store::{MappingStore, MemoryStore, RedisOptions, RedisStore, StoreError};

const CREATES: usize = 1_000;
const LOOKUPS: usize = 10_000;
const ROUNDS: usize = 200;
const CONTENDERS: usize = 10;

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
    n: usize,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        max: *samples.last().unwrap(),
        n: samples.len(),
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn row(name: &str, s: &Stats, baseline: Option<&Stats>) -> String {
    let ratio = baseline
        .map(|b| format!("{:.2}×", s.p50.as_secs_f64() / b.p50.as_secs_f64()))
        .unwrap_or_else(|| "—".into());
    format!(
        "| {name} | {} | {} | {} | {} | {ratio} |",
        s.n,
        us(s.p50),
        us(s.p99),
        us(s.max)
    )
}

fn spec(sub: &str) -> MappingSpec {
    MappingSpec::new(sub, "tunnox.net", "127.0.0.1", 8080)
}

async fn creates(store: &dyn MappingStore, prefix: &str) -> (Stats, Vec<Hostname>) {
    let mut samples = Vec::with_capacity(CREATES);
    let mut domains = Vec::with_capacity(CREATES);
    for i in 0..CREATES {
        let t = Instant::now();
        let m = store
            .create(spec(&format!("{prefix}{i}")))
            .await
            .expect("create");
        samples.push(t.elapsed());
        domains.push(m.full_domain);
    }
    (stats(samples), domains)
}

async fn lookups(store: &dyn MappingStore, domains: &[Hostname]) -> Stats {
    let mut samples = Vec::with_capacity(LOOKUPS);
    for i in 0..LOOKUPS {
        let d = &domains[(i * 7919) % domains.len()];
        let t = Instant::now();
        let m = store.get_by_domain(d).await.expect("lookup");
        samples.push(t.elapsed());
        assert!(m.is_some());
    }
    stats(samples)
}

async fn contested(handles: &[Arc<dyn MappingStore>]) -> Stats {
    let mut samples = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let t = Instant::now();
        let tasks: Vec<_> = handles
            .iter()
            .map(|s| {
                let s = s.clone();
                tokio::spawn(async move { s.create(spec(&format!("contested{round}"))).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(StoreError::DomainTaken { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        samples.push(t.elapsed());
        assert_eq!(wins, 1, "round {round}");
    }
    stats(samples)
}

/// The floor: one `SET … NX` round trip with the same client library.
async fn raw_set_nx(url: &str) -> Stats {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut samples = Vec::with_capacity(CREATES);
    for i in 0..CREATES {
        let t = Instant::now();
        let _: Option<String> = redis::cmd("SET")
            .arg(format!("raw:{i}"))
            .arg("x")
            .arg("NX")
            .query_async(&mut conn)
            .await
            .unwrap();
        samples.push(t.elapsed());
    }
    stats(samples)
}

async fn raw_get(url: &str) -> Stats {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut samples = Vec::with_capacity(LOOKUPS);
    for i in 0..LOOKUPS {
        let t = Instant::now();
        let _: Option<String> = redis::cmd("GET")
            .arg(format!("raw:{}", i % CREATES))
            .query_async(&mut conn)
            .await
            .unwrap();
        samples.push(t.elapsed());
    }
    stats(samples)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // AOF with the production default fsync policy (everysec).
        let server = support::RedisServer::start_with(&["--appendfsync", "everysec"]);
        let url = server.url();
        let redis: Arc<dyn MappingStore> = Arc::new(RedisStore::connect(RedisOptions::new(&server.addr())).await.unwrap());
        let memory: Arc<dyn MappingStore> = Arc::new(MemoryStore::new());

        let raw_create = raw_set_nx(&url).await;
        let (redis_create, redis_domains) = creates(redis.as_ref(), "r").await;
        let raw_lookup = raw_get(&url).await;
        let redis_lookup = lookups(redis.as_ref(), &redis_domains).await;
        let (mem_create, mem_domains) = creates(memory.as_ref(), "m").await;
        let mem_lookup = lookups(memory.as_ref(), &mem_domains).await;

        let mut handles = Vec::new();
        for _ in 0..CONTENDERS {
            let mut o = RedisOptions::new(&server.addr());
            o.pool_size = 1;
            handles.push(Arc::new(RedisStore::connect(o).await.unwrap()) as Arc<dyn MappingStore>);
        }
        let redis_contested = contested(&handles).await;
        let mem_handles: Vec<Arc<dyn MappingStore>> = (0..CONTENDERS).map(|_| memory.clone()).collect();
        let mem_contested = contested(&mem_handles).await;

        println!("## Mapping store (issue: foundation)\n");
        println!("One tokio worker thread drives the store; `redis-server` runs in its own process with AOF (`appendfsync everysec`).");
        println!("Ratios compare the p50 with the bare Redis round trip measured with the same client in the same run.\n");
        println!("| operation | n | p50 | p99 | max | p50 vs floor |");
        println!("|---|---|---|---|---|---|");
        println!("{}", row("floor: `SET k v NX` (one round trip)", &raw_create, None));
        println!("{}", row("create (Lua: claim + record + indexes + version + log + publish)", &redis_create, Some(&raw_create)));
        println!("{}", row("floor: `GET k` (one round trip)", &raw_lookup, None));
        println!("{}", row("lookup by domain (Lua: claim → record, then JSON decode)", &redis_lookup, Some(&raw_lookup)));
        println!("{}", row(&format!("contested claim: {CONTENDERS} creators, separate connections (per round, all answered)"), &redis_contested, Some(&raw_create)));
        println!("{}", row("memory store: create", &mem_create, None));
        println!("{}", row("memory store: lookup by domain", &mem_lookup, None));
        println!("{}", row(&format!("memory store: contested claim, {CONTENDERS} tasks (per round)"), &mem_contested, None));
        println!();
        let goal = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "Goals: create p99 < 5 ms (seed: < 50 ms): **{}** ({}); every contested round had exactly one winner ({ROUNDS} rounds).\n",
            goal(redis_create.p99 < Duration::from_millis(5)),
            us(redis_create.p99)
        );
    });
}
