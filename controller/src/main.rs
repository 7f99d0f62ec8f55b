//! The `cim` command line: `run` starts the controller; `validate`,
//! `status`, `events` and `reconcile` are its clients. This is the only
//! place that uses `anyhow`: it turns library errors into exit codes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use cim::api::ReconcileRequest;
use cim::client::Source;
use cim::store::EventQuery;
use cim::{render, spec};

mod inspect;
mod run;
use inspect::{plan, status, watch_status};
use run::run;

#[derive(Parser)]
#[command(
    name = "cim",
    version,
    about = "GitOps reconciliation controller for NixOS fleets",
    // The last of a repeated option wins, as in most Unix tools.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch a git repository and keep every host converged to it.
    Run(Box<RunArgs>),
    /// Check a repository's (or work tree's) specs offline.
    Validate {
        /// Repository or work tree; its `specs/*.yaml` are checked.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Show where every host (or one host) stands.
    Status {
        host: Option<String>,
        /// Keep showing it, redrawn whenever an event changes it (Ctrl-C
        /// ends it).
        #[arg(long, short)]
        watch: bool,
        /// Only hosts whose labels match, e.g. `role=web,tier=front`.
        #[arg(long, short = 'l', conflicts_with = "host")]
        selector: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Show what a revision would change on every host, before it lands.
    ///
    /// For the branch head (or REVISION): packages added, removed and
    /// upgraded, the closure size delta, what activation would start, stop
    /// and restart, and whether a reboot is needed. Copies the new closures
    /// to the hosts to ask them (`dry-activate`); changes nothing they run.
    Plan {
        /// A commit (or a unique prefix), branch or tag.
        revision: Option<String>,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Compare closures only: copy nothing, ask no host what
        /// activation would do.
        #[arg(long)]
        no_activation: bool,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Show the event log.
    Events {
        #[arg(long)]
        host: Option<String>,
        /// Only events of hosts whose labels match, e.g. `role=web`.
        #[arg(long, short = 'l', conflicts_with = "host")]
        selector: Option<String>,
        /// Keep printing new events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long)]
        since: Option<u64>,
        /// At most this many (the newest, unless --since is given); the
        /// newest 50 by default, as `kubectl get events` shows the recent past.
        #[arg(long, conflicts_with = "all")]
        limit: Option<u32>,
        /// The whole history, however long.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Reconcile one host, or all, now (all also resumes a halted rollout).
    Reconcile {
        #[arg(
            required_unless_present_any = ["all", "selector"],
            conflicts_with_all = ["all", "selector"]
        )]
        host: Option<String>,
        /// The hosts whose labels match, e.g. `role=web`.
        #[arg(long, short = 'l', conflicts_with = "all")]
        selector: Option<String>,
        /// Every host.
        #[arg(long)]
        all: bool,
        /// Wait until the reconcile asked for is handled, showing its
        /// progress; exits 0 if every host converged, 1 if one failed, 2
        /// on --timeout.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "30m", value_parser = spec::parse_duration, requires = "wait")]
        timeout: Duration,
        /// Emergency: work on the hosts even though the deployment windows
        /// are closed (recorded as a `WindowForced` event).
        #[arg(long)]
        force_window: bool,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Emergency: suspend a host and switch it to its previous generation.
    Rollback {
        host: String,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Reboot a host now; the controller waits for it to come back.
    ///
    /// Within the host's `rebootTimeout`; `cim status HOST` and `cim
    /// events` show when it is back (`Rebooted`) or that it is not
    /// (`RebootTimedOut`).
    Reboot {
        host: String,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Hand a host suspended by `cim rollback` back to the controller.
    Resume {
        host: String,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Let a wave with `approval: manual` go ahead.
    Approve {
        /// The revision being rolled out (at least 7 digits).
        revision: String,
        /// The wave, by name or number (default: the one waiting).
        #[arg(long)]
        wave: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Deploy a revision held back because it rewrote the branch's history
    /// (`--refuse-rewrites`).
    Accept {
        /// The commit id (at least 7 digits).
        revision: String,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Print a shell completion script (e.g. `cim completions bash >
    /// /etc/bash_completion.d/cim`).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff; `cim man | man -l -`).
    Man,
    /// Benchmark the controller: drive simulated hosts (no ssh, no nix)
    /// through one whole-fleet change and print what it cost, as JSON.
    Simulate(SimulateArgs),
}

#[derive(Args)]
struct SimulateArgs {
    #[arg(long, default_value_t = 10_000)]
    hosts: usize,
    #[arg(long, default_value_t = 1_000)]
    max_parallel: usize,
    /// Where the simulation's store goes (a new temporary directory if
    /// not given).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The API, served while the simulation runs (port 0: any free port;
    /// the address is printed first).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Simulated latencies, in milliseconds.
    #[arg(long, default_value_t = 50)]
    connect_ms: u64,
    #[arg(long, default_value_t = 10)]
    command_ms: u64,
    #[arg(long, default_value_t = 500)]
    copy_ms: u64,
    #[arg(long, default_value_t = 1000)]
    activate_ms: u64,
    #[arg(long, default_value_t = 1000)]
    evaluate_ms: u64,
    #[arg(long, default_value_t = 200)]
    build_ms: u64,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = spec::parse_duration)]
    deadline: Duration,
    /// Keep the converged controller and its API up until interrupted.
    #[arg(long)]
    hold: bool,
    /// Measure the controller meeting the fleet (its first revision on
    /// hosts it has never seen) instead of a change of a fleet it knows.
    #[arg(long)]
    first_contact: bool,
    /// Roll out under a `kind: Fleet` policy, as a cautious operator
    /// would: a canary wave (1% of the hosts), then the rest as a second
    /// wave that also depends on the canaries, and a failure budget of 1%.
    #[arg(long)]
    policy: bool,
    /// Change only this many hosts' systems (the last in name order) and
    /// report when they converged; the others are only looked at.
    #[arg(long)]
    changed: Option<usize>,
}

#[derive(Args)]
struct SourceArgs {
    /// Controller API to ask.
    #[arg(long, env = "CIM_API", default_value = "http://127.0.0.1:7878")]
    api: String,
    /// Read the store in this state directory instead of asking a controller.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The controller's API token, in a file (or set CIM_API_TOKEN).
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// For an https API: the certificate (or CA) to trust, PEM; without
    /// it the usual public roots.
    #[arg(long, env = "CIM_API_CA_FILE")]
    api_ca_file: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// Local path or URL of the git repository to watch.
    #[arg(long)]
    repo: String,
    #[arg(long, default_value = "main")]
    branch: String,
    /// Where the event log, status and git mirror live.
    #[arg(long, default_value = ".cim")]
    state_dir: PathBuf,
    /// Where the API listens. Beyond loopback it needs --api-token-file.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// A file holding the API token: required for every request that
    /// changes something, and for every request when --listen is not a
    /// loopback address.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Serve the API over TLS with this certificate (chain, PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A name (or name:port) the API is reached by, besides its listen
    /// address and localhost; other Host headers are refused (repeatable).
    #[arg(long = "api-allowed-host")]
    api_allowed_hosts: Vec<String>,
    /// How often to fetch (local repositories are also watched for changes).
    #[arg(long, default_value = "30s", value_parser = spec::parse_duration)]
    poll_interval: Duration,
    /// How often every host is re-checked for drift.
    #[arg(long, default_value = "5m", value_parser = spec::parse_duration)]
    resync_interval: Duration,
    /// Hosts worked on at once.
    #[arg(long, default_value_t = 10)]
    max_parallel: usize,
    /// ssh_config file used for every ssh connection, including nix copy's.
    #[arg(long)]
    ssh_config: Option<PathBuf>,
    /// Extra nix option for every nix invocation, as NAME=VALUE (repeatable).
    #[arg(long = "nix-option", value_parser = parse_nix_option)]
    nix_options: Vec<(String, String)>,
    /// First retry delay of a failed host; doubles per failure.
    #[arg(long, default_value = "5s", value_parser = spec::parse_duration)]
    backoff_base: Duration,
    /// Longest retry delay.
    #[arg(long, default_value = "5m", value_parser = spec::parse_duration)]
    backoff_max: Duration,
    /// SSH connect timeout.
    #[arg(long, default_value = "10s", value_parser = spec::parse_duration)]
    connect_timeout: Duration,
    /// Longest a revision's evaluation may take; past it the evaluation's
    /// processes are killed and its hosts get `BuildFailed`.
    #[arg(long, default_value = "30m", value_parser = spec::parse_duration)]
    eval_timeout: Duration,
    /// Longest one build may take.
    #[arg(long, default_value = "4h", value_parser = spec::parse_duration)]
    build_timeout: Duration,
    /// Longest a git fetch may take before it is interrupted and retried.
    #[arg(long, default_value = "5m", value_parser = spec::parse_duration)]
    fetch_timeout: Duration,
    /// Hosts fetch what they can from their own binary caches while their
    /// closure is copied (`nix copy --substitute-on-destination`); a host's
    /// or the Fleet document's `substituteOnDestination` overrides it.
    /// On by default with --push-to-cache.
    #[arg(long)]
    substitute_on_destination: bool,
    /// Nix store URL of a binary cache every built closure is pushed to
    /// once (e.g. file:///srv/nix-cache served over HTTP, or s3://bucket);
    /// hosts then substitute from it. Needs --cache-signing-key.
    #[arg(long, requires = "cache_signing_key")]
    push_to_cache: Option<String>,
    /// Which events to keep: an age (`30d`), a count (`1000000`), or both
    /// (`30d,1000000`); older ones are deleted in the background. The
    /// status is unaffected. Default: keep everything.
    #[arg(long, value_parser = cim::store::Retention::parse)]
    event_retention: Option<cim::store::Retention>,
    /// Nix secret key file (`nix key generate-secret`) that paths pushed to
    /// --push-to-cache are signed with; hosts trust its public key.
    #[arg(long, requires = "push_to_cache")]
    cache_signing_key: Option<PathBuf>,
    /// A file holding the secret of push hooks (`POST /hooks/git` from
    /// GitHub, Gitea, GitLab or a post-receive script): a hook signed with
    /// it makes cim fetch at once.
    #[arg(long)]
    webhook_secret_file: Option<PathBuf>,
    /// Deploy only commits signed by a key of --allowed-signers; others
    /// are reported (`UnsignedRevision`, `UntrustedSigner`) and change
    /// nothing.
    #[arg(long, requires = "allowed_signers")]
    require_signed_commits: bool,
    /// git's allowed_signers file (SSH keys) that commits must be signed
    /// by. Part of the controller's configuration: never read from the
    /// repository it judges.
    #[arg(long, requires = "require_signed_commits")]
    allowed_signers: Option<PathBuf>,
    /// A head that does not descend from the previous one (a force-push)
    /// is not deployed until `cim accept REV`.
    #[arg(long)]
    refuse_rewrites: bool,
    /// POST Warning events and rollout outcomes (converged, halted, rolled
    /// back) to this URL (repeatable).
    #[arg(long = "notify")]
    notify_urls: Vec<String>,
    /// How notifications look: the event as JSON, or a Slack message.
    #[arg(long, value_enum, default_value = "json")]
    notify_format: cim::notify::Format,
    /// Notify only these reasons (repeatable; e.g. RolloutHalted).
    #[arg(long = "notify-reason")]
    notify_reasons: Vec<String>,
    /// Notify only events of these hosts (repeatable).
    #[arg(long = "notify-host")]
    notify_hosts: Vec<String>,
    /// Write each rollout's outcome (per host: phase, system, time) as a
    /// git note on its commit, under refs/notes/cim in the mirror.
    #[arg(long)]
    write_notes: bool,
    /// Push refs/notes/cim to the watched repository after each note
    /// (`git log --notes=cim` there shows where each commit went).
    #[arg(long, requires = "write_notes")]
    push_notes: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn parse_nix_option(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE"))?;
    Ok((name.to_string(), value.to_string()))
}

/// jemalloc rather than glibc's malloc: with 10,000 workers and the API's
/// threads allocating at once, glibc's per-thread arenas cost the simulated
/// fleet a third more CPU per event and kept freed memory (BENCHMARKS.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start: freed pages go back to the
/// system within a second rather than ten (a burst of 10,000 workers
/// leaves them all at once), and not in two steps.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string's address, as jemalloc reads `malloc_conf`: one thin pointer.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points at a string literal, which is never written.
unsafe impl Sync for MallocConf {}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Validate { path } => validate(&path),
        Command::Simulate(args) => simulate(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "cim", &mut std::io::stdout());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Man => man(),
        Command::Status {
            host,
            watch: false,
            selector,
            source,
        } => status(host, selector.as_deref(), &source),
        Command::Status {
            host,
            watch: true,
            selector,
            source,
        } => watch_status(host, selector.as_deref(), &source),
        Command::Plan {
            revision,
            host,
            no_activation,
            source,
        } => plan(revision, host, !no_activation, &source),
        Command::Events {
            host,
            follow,
            since,
            limit,
            all,
            selector,
            source,
        } => {
            let limit = match (limit, all || since.is_some() || follow) {
                (None, false) => Some(DEFAULT_EVENTS),
                (limit, _) => limit,
            };
            events(
                EventQuery {
                    host,
                    hosts: None,
                    since,
                    limit,
                    selector,
                },
                follow,
                &source,
            )
        }
        Command::Reconcile {
            host,
            all: _,
            selector,
            wait,
            timeout,
            force_window,
            source,
        } => match selector
            .as_deref()
            .map(cim::api::parse_selector)
            .transpose()
        {
            Err(e) => Err(anyhow::anyhow!("--selector: {e}")),
            Ok(selector) => {
                let request = ReconcileRequest {
                    host,
                    selector,
                    force_window,
                };
                if wait {
                    reconcile_and_wait(&request, timeout, &source)
                } else {
                    reconcile(&request, &source)
                }
            }
        },
        Command::Rollback { host, source: s } => source(&s).and_then(|s| say(s.rollback(&host))),
        Command::Resume { host, source: s } => source(&s).and_then(|s| say(s.resume(&host))),
        Command::Reboot { host, source: s } => source(&s).and_then(|s| say(s.reboot(&host))),
        Command::Accept {
            revision,
            source: s,
        } => source(&s).and_then(|s| say(s.accept(&revision))),
        Command::Approve {
            revision,
            wave,
            source: s,
        } => source(&s).and_then(|s| say(s.approve(&revision, wave))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Exit = Result<std::process::ExitCode>;

fn source(args: &SourceArgs) -> Result<Source> {
    Ok(match &args.state_dir {
        Some(dir) => Source::Store(dir.clone()),
        None => Source::Api(cim::client::Api {
            base: args.api.clone(),
            agent: cim::client::agent(args.api_ca_file.as_deref())?,
            token: match (&args.api_token_file, std::env::var("CIM_API_TOKEN")) {
                (Some(file), _) => Some(read_token(file)?),
                (None, Ok(token)) if !token.trim().is_empty() => Some(token.trim().to_string()),
                _ => None,
            },
        }),
    })
}

/// The API token in `file`: its content, without surrounding whitespace.
fn read_token(file: &Path) -> Result<String> {
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the API token file {}", file.display()))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("the API token file {} is empty", file.display());
    }
    Ok(token.to_string())
}

/// Prints a line of output. A reader that went away (`cim status | head`)
/// ends the command quietly, as it does for other Unix tools, instead of
/// panicking on the broken pipe.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {e}");
        std::process::exit(1);
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    emit(&serde_json::to_string_pretty(value)?);
    Ok(())
}

fn validate(path: &Path) -> Exit {
    let files = cim::git::specs_for_validation(path)?;
    if files.is_empty() {
        bail!("no specs/*.yaml in {}", path.display());
    }
    match spec::parse_fleet(&files) {
        Ok(fleet) => {
            emit(&format!(
                "{} hosts in {} files: ok",
                fleet.hosts.len(),
                files.len()
            ));
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors.errors {
                eprintln!("{:?}", miette::Report::new(e.clone()));
            }
            eprintln!("{} problems found", errors.errors.len());
            Ok(std::process::ExitCode::FAILURE)
        }
    }
}

/// How many events `cim events` shows without --limit, --since or --all.
const DEFAULT_EVENTS: u32 = 50;

fn events(q: EventQuery, follow: bool, args: &SourceArgs) -> Exit {
    let src = source(args)?;
    if follow {
        let print = |ev: &cim::event::Event| {
            let line = match args.output {
                Output::Json => serde_json::to_string(ev).unwrap_or_default(),
                Output::Table => render::event_line(ev),
            };
            emit(&line);
            true
        };
        src.follow(&q, print)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let evs = src.events(&q)?;
    // Say so when the history shown starts where retention cut it.
    if let Some(first) = evs.first().filter(|e| e.seq > 1) {
        if let Ok(status) = src.status() {
            if status.trimmed_through > 0 && first.seq <= status.trimmed_through + 1 {
                eprintln!(
                    "(events up to #{} were deleted by --event-retention)",
                    status.trimmed_through
                );
            }
        }
    }
    if q.since.is_none() && q.limit == Some(DEFAULT_EVENTS) && evs.len() == DEFAULT_EVENTS as usize
    {
        eprintln!("(the newest {DEFAULT_EVENTS} events; --all or --limit N for more)");
    }
    match args.output {
        Output::Json => print_json(&evs)?,
        Output::Table => emit(&render::events(&evs, time::OffsetDateTime::now_utc())),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn reconcile(request: &ReconcileRequest, args: &SourceArgs) -> Exit {
    say(source(args)?.reconcile(request))
}

/// `cim reconcile --wait`: asks, then follows the event log until every
/// host asked for has an outcome (see `cim::wait`), with progress bars on a
/// terminal and plain lines elsewhere.
fn reconcile_and_wait(request: &ReconcileRequest, timeout: Duration, args: &SourceArgs) -> Exit {
    use std::io::IsTerminal;
    let (host, selector) = (&request.host, &request.selector);
    let src = source(args)?;
    let since = src.newest_seq()?;
    let hosts: Vec<String> = match (&host, &selector) {
        (Some(h), _) => vec![h.clone()],
        (None, Some(selector)) => {
            let text: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            src.select(&text.join(","))?
        }
        (None, None) => src
            .status()?
            .hosts
            .into_iter()
            .filter(|h| h.phase != cim::event::Phase::Suspended)
            .map(|h| h.name)
            .collect(),
    };
    emit(&src.reconcile(request)?);
    let mut tracker = cim::wait::Tracker::new(hosts);
    if tracker.total() == 0 {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let started = std::time::Instant::now();
    // The log is followed on a thread of its own; this one keeps the time.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = src.follow(
            &EventQuery {
                since: Some(since),
                ..EventQuery::default()
            },
            |ev| tx.send(ev.clone()).is_ok(),
        );
    });
    let bars = std::io::stdout().is_terminal().then(|| {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} hosts {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let overall =
            multi.add(indicatif::ProgressBar::new(tracker.total() as u64).with_style(style));
        let lines: std::collections::BTreeMap<String, indicatif::ProgressBar> = tracker
            .hosts()
            .map(|h| {
                let line = multi.add(indicatif::ProgressBar::new_spinner());
                line.set_message(format!("{h}: waiting"));
                line.enable_steady_tick(Duration::from_millis(120));
                (h.to_string(), line)
            })
            .collect();
        (overall, lines)
    });
    while !tracker.done() {
        let Some(left) = timeout.checked_sub(started.elapsed()) else {
            break;
        };
        let Ok(ev) = rx.recv_timeout(left) else {
            break;
        };
        let Some(line) = tracker.observe(&ev) else {
            continue;
        };
        match &bars {
            Some((overall, lines)) => {
                if let Some(bar) = ev.host.as_ref().and_then(|h| lines.get(h)) {
                    bar.set_message(cim::render::printable(&line));
                    if matches!(
                        tracker.state(ev.host.as_deref().unwrap_or("")),
                        Some(cim::wait::HostState::Converged | cim::wait::HostState::Failed(_))
                    ) {
                        bar.finish();
                    }
                }
                overall.set_position(tracker.ended() as u64);
            }
            None => emit(&cim::render::printable(&line)),
        }
    }
    if let Some((overall, lines)) = bars {
        lines.values().for_each(indicatif::ProgressBar::finish);
        overall.finish();
    }
    emit(&tracker.summary(started.elapsed()));
    Ok(if !tracker.done() {
        std::process::ExitCode::from(2)
    } else if tracker.not_converged().is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

/// Prints the controller's answer to a request.
fn say(answer: Result<String, cim::client::ClientError>) -> Exit {
    emit(&answer?);
    Ok(std::process::ExitCode::SUCCESS)
}

/// The manual page, from the same definitions as `--help`.
fn man() -> Exit {
    use clap::CommandFactory;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    emit(String::from_utf8_lossy(&page).trim_end());
    Ok(std::process::ExitCode::SUCCESS)
}

fn simulate(args: SimulateArgs) -> Exit {
    let temporary = args.state_dir.is_none();
    let state_dir = args.state_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cim-simulate-{}", std::process::id()))
    });
    if temporary && state_dir.exists() {
        bail!("{} exists already", state_dir.display());
    }
    let ms = Duration::from_millis;
    let opts = cim::simulate::SimulateOptions {
        hosts: args.hosts,
        max_parallel: args.max_parallel,
        state_dir: state_dir.clone(),
        listen: args.listen,
        sim: cim::host::sim::SimConfig {
            connect: ms(args.connect_ms),
            command: ms(args.command_ms),
            copy: ms(args.copy_ms),
            activate: ms(args.activate_ms),
            evaluate: ms(args.evaluate_ms),
            build: ms(args.build_ms),
            ..Default::default()
        },
        deadline: args.deadline,
        hold: args.hold,
        first_contact: args.first_contact,
        policy: args.policy,
        changed: args.changed,
    };
    let runtime = cim::priority::runtime()?;
    let report = runtime.block_on(cim::simulate::simulate(opts, |addr| {
        emit(&format!("api http://{addr}"));
    }));
    if temporary {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    emit(&serde_json::to_string(&report?)?);
    Ok(std::process::ExitCode::SUCCESS)
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_options_parse() {
        assert_eq!(
            parse_nix_option("substituters="),
            Ok(("substituters".into(), String::new()))
        );
        assert!(parse_nix_option("nope").is_err());
    }
}
