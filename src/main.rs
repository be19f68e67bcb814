//! The `tunnox` binary: parse the command line, set up logging, run one role.
// One item is allowed unsafe code: `COMMIT_ON_USE`, an entry of `.init_array`.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use tunnox::config::{self, ProcessEnv};

/// The proxy allocates per request (hyper's timers, bodies, headers): mimalloc's thread-local
/// free lists measured faster than the system allocator under load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc reserves its first arena at the first allocation, before `main` (the runtime
/// allocates first), and reads how to commit it then: this sets it from the process's
/// constructors, which run before anything allocates (docs/proxy.md "Route memory").
#[used]
#[allow(unsafe_code)]
#[unsafe(link_section = ".init_array")]
static COMMIT_ON_USE: extern "C" fn() = {
    extern "C" fn commit_on_use() {
        tunnox::observe::memory::commit_on_use();
    }
    commit_on_use
};

/// Exit code for invalid configuration (EX_CONFIG-style, as linkerd2-proxy uses 64).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tunnox",
    version,
    about = "Kubernetes-native HTTP domain routing and tunnelling"
)]
struct Cli {
    /// Configuration file (YAML). Without it the built-in defaults apply.
    #[arg(long, short, global = true, env = "TUNNOX_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile HTTPDomainMapping and TunnelSet resources into Redis and status.
    Controller,
    /// Serve HTTP by Host and carry tunnels (single-node with storage.type memory).
    Proxy,
    /// Tunnel client beside a private service (docs/agent.md).
    Agent(AgentArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Print the management API's OpenAPI document (docs/openapi.json).
    Openapi,
    /// Validate the configuration, print the auto-sharing decisions and the effective settings.
    CheckConfig,
    /// Ask the proxy in this pod to drain (POST /drain on its admin port): the preStop hook.
    Drain(DrainArgs),
}

#[derive(clap::Args)]
struct DrainArgs {
    /// The proxy's admin address; default proxy.admin_listen (over loopback when it is 0.0.0.0).
    #[arg(long, env = "TUNNOX_DRAIN_ADMIN")]
    admin: Option<SocketAddr>,
    /// How long the proxy waits, not ready, before answering; default proxy.drain.propagation_delay.
    #[arg(long, env = "TUNNOX_DRAIN_WAIT", value_parser = tunnox::cli::drain::parse_wait)]
    wait: Option<Duration>,
    /// A file with the admin bearer token; default proxy.admin_token_file.
    #[arg(long, env = "TUNNOX_DRAIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

/// `tunnox agent` flags; each overrides the `agent:` field of the same name.
#[derive(clap::Args)]
struct AgentArgs {
    /// Proxy tunnel address(es), host:port; repeat or separate with commas.
    #[arg(long, env = "TUNNOX_AGENT_SERVER", value_delimiter = ',')]
    server: Vec<String>,
    /// Client id this agent authenticates as.
    #[arg(long, env = "TUNNOX_AGENT_CLIENT_ID")]
    client_id: Option<String>,
    /// File holding the client's token.
    #[arg(long, env = "TUNNOX_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the proxy with; default the system's roots.
    #[arg(long, env = "TUNNOX_AGENT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// TLS name to verify; default the host of the address dialled.
    #[arg(long, env = "TUNNOX_AGENT_SERVER_NAME")]
    server_name: Option<String>,
    /// A local target the agent may forward to, host:port; repeat or separate with commas.
    #[arg(long, env = "TUNNOX_AGENT_ALLOW", value_delimiter = ',')]
    allow: Vec<String>,
    /// Sessions to hold at once (1-16), to different proxies when several are known.
    #[arg(long, env = "TUNNOX_AGENT_SESSIONS")]
    sessions: Option<u32>,
    /// Address for /metrics and /healthz.
    #[arg(long, env = "TUNNOX_AGENT_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Plain TCP to the proxy, no TLS (tests on loopback only).
    #[arg(long, env = "TUNNOX_AGENT_INSECURE")]
    insecure: bool,
    /// Runtime threads: 0 = one per CPU, 1 = single-threaded (best on one core).
    #[arg(long, env = "TUNNOX_AGENT_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// File where the configuration proxies push is kept, and read back at start.
    #[arg(long, env = "TUNNOX_AGENT_CONFIG_CACHE")]
    config_cache: Option<PathBuf>,
}

impl AgentArgs {
    /// Flags over the file's `agent:` section.
    fn apply(self, cfg: &mut config::AgentConfig) {
        let list = |v: Vec<String>| {
            v.iter()
                .flat_map(|s| config::agent::split_list(s))
                .collect::<Vec<_>>()
        };
        if !self.server.is_empty() {
            cfg.server = list(self.server);
        }
        if let Some(v) = self.client_id {
            cfg.client_id = v;
        }
        if let Some(v) = self.token_file {
            cfg.token_file = Some(v);
            cfg.token = None;
        }
        if let Some(v) = self.ca_file {
            cfg.ca_file = Some(v);
        }
        if let Some(v) = self.server_name {
            cfg.server_name = Some(v);
        }
        if !self.allow.is_empty() {
            cfg.allow = list(self.allow);
        }
        if let Some(v) = self.sessions {
            cfg.sessions = v;
        }
        if let Some(v) = self.admin_listen {
            cfg.admin_listen = Some(v);
        }
        if self.insecure {
            cfg.insecure = true;
        }
        if let Some(v) = self.worker_threads {
            cfg.worker_threads = v;
        }
        if let Some(v) = self.config_cache {
            cfg.config_cache = Some(v);
        }
    }
}

/// `tunnox agent`: flags over the file, validated, then run until SIGTERM.
fn agent(args: AgentArgs, settings: &config::Settings, origin: &str) -> ExitCode {
    let mut cfg = settings.config.agent.clone();
    args.apply(&mut cfg);
    let token = match cfg.validate(origin).and_then(|()| cfg.read_token(origin)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tunnox: invalid configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let runtime = match runtime(cfg.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnox agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    report("agent", runtime.block_on(tunnox::agent::run(cfg, token)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Openapi = cli.command {
        print!("{}", tunnox::api::openapi_json());
        return ExitCode::SUCCESS;
    }
    if let Command::Crd = cli.command {
        return match tunnox::crd::definitions_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tunnox crd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = match config::load(cli.config.as_deref(), &ProcessEnv) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tunnox: invalid configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    // One TLS provider for every client (Kubernetes, Redis, upstreams): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let log = &settings.config.log;
    tunnox::observe::init_tracing(&log.level, log.format);
    for line in &settings.auto_shared {
        tracing::info!("✅ {line}");
    }
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    match cli.command {
        Command::CheckConfig => {
            let backend = if settings.uses_redis {
                "redis"
            } else {
                "memory"
            };
            println!("configuration OK (mapping store: {backend})");
            let mut shown = settings.config.clone();
            for pw in [
                &mut shown.storage.redis.password,
                &mut shown.storage.redis.sentinel.password,
                &mut shown.message_broker.redis.password,
            ] {
                if !pw.is_empty() {
                    *pw = "<redacted>".into();
                }
            }
            if let Some(token) = shown.agent.token.as_mut() {
                *token = "<redacted>".into();
            }
            for t in &mut shown.api.tokens {
                if let Some(token) = t.token.as_mut() {
                    *token = "<redacted>".into();
                }
            }
            match serde_yaml::to_string(&shown) {
                Ok(yaml) => print!("{yaml}"),
                Err(e) => eprintln!("cannot print configuration: {e}"),
            }
            ExitCode::SUCCESS
        }
        Command::Crd | Command::Openapi => {
            unreachable!("handled before configuration is loaded")
        }
        Command::Drain(args) => drain(args, &settings),
        Command::Controller => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tunnox controller: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            report(
                "controller",
                runtime.block_on(tunnox::controller::run(settings)),
            )
        }
        Command::Proxy => {
            let runtime = match runtime(settings.config.proxy.worker_threads) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tunnox proxy: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            report("proxy", runtime.block_on(tunnox::proxy::run(settings)))
        }
        Command::Agent(args) => {
            let origin = cli.config.as_deref().map_or_else(
                || "flags".to_string(),
                |p| format!("{} and flags", p.display()),
            );
            agent(args, &settings, &origin)
        }
    }
}

/// `tunnox drain`: exit 0 once the proxy drained, 1 with the reason when it did not.
fn drain(args: DrainArgs, settings: &config::Settings) -> ExitCode {
    let proxy = &settings.config.proxy;
    let token = match args.token_file {
        Some(path) => match config::read_secret(&path, "--token-file", "tunnox drain") {
            Ok(t) => Some(config::AdminToken::new(t)),
            Err(e) => {
                eprintln!("tunnox: invalid configuration: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
        None => settings.admin_token.clone(),
    };
    let req = tunnox::cli::drain::DrainRequest {
        admin: args
            .admin
            .unwrap_or_else(|| tunnox::cli::drain::default_admin(proxy.admin_listen)),
        wait: Some(args.wait.unwrap_or(proxy.drain.propagation_delay.get())),
        token,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnox drain: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tunnox::cli::drain::drain(&req)) {
        Ok(answer) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tunnox drain: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One thread serves best on one core (no work stealing); otherwise one worker per thread.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 1 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

fn report<E: std::fmt::Display>(role: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{role} stopped");
            eprintln!("tunnox {role}: {e}");
            ExitCode::FAILURE
        }
    }
}
