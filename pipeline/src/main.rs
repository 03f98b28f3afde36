//! The `ebb` command.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

use ebb::clock::{Clock, SystemClock};

/// Stages allocate and free a few small strings per record while librdkafka's threads
/// allocate what they fetch: with mimalloc instead of glibc's malloc, `ebb bench filter` did
/// 415k rather than 360k records/s in-process and 220k rather than 190k through Kafka.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ebb::config::Config;
use ebb::demo::generator::{Generator, WireFormat};
use ebb::demo::{self, Pace, ProduceCounts, ProduceJob};
use ebb::metrics::Metrics;
use ebb::{bench, runner, schemas, topics, wiring};

#[derive(Parser, Debug)]
#[command(
    name = "ebb",
    version,
    about = "Forecast-driven autoscaling and anomaly detection on Kafka"
)]
struct Cli {
    /// Config file (TOML); also EBB_CONFIG. Without one, built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides config and EBB_BROKERS).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    brokers: Option<String>,
    /// Schema registry URL (overrides config and EBB_REGISTRY_URL).
    #[arg(long, global = true, value_name = "URL")]
    registry: Option<String>,
    /// Log filter, e.g. `info`, `ebb=debug` (also RUST_LOG).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline in one process on an in-process mock Kafka, with synthetic telemetry.
    Demo {
        /// Stop after this long (e.g. 20s, 5m); without it, run until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Print the final figures as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// HTTP listen address for /metrics and /healthz [default: 127.0.0.1:9470, or http.listen].
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<String>,
    },
    /// Run a stage (or all) against a Kafka cluster until SIGTERM/SIGINT.
    Run {
        /// Which stage.
        stage: StageName,
        /// HTTP listen address for /metrics and /healthz [default: 127.0.0.1:9470, or http.listen].
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<String>,
    },
    /// Carry commands out: a consumer group on `commands`, one record per command on
    /// `actuations`, idempotent by command id.
    Actuate {
        /// How commands are carried out.
        #[arg(long, value_enum)]
        driver: DriverName,
        /// Record what would be done, do nothing.
        #[arg(long)]
        dry_run: bool,
        /// Webhook URL (overrides actuate.webhook.url).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// HTTP listen address for /metrics and /healthz [default: http.listen].
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<String>,
    },
    /// Backtest on recorded data. `--file`: ebb's scaling policy on one service's recorded
    /// load against a reactive HPA baseline, static provisioning and an oracle (report.json,
    /// report.md, plots). `--topic`: a recorded raw telemetry topic through the whole
    /// pipeline (filter, window, models, decide) on a simulated clock, outputs to files, and
    /// each service's load through the same comparison (a fleet report).
    Replay {
        /// CSV, JSON lines (.jsonl) or Parquet (.parquet) file: one service's request rate
        /// over time.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "topic",
            conflicts_with = "topic"
        )]
        file: Option<PathBuf>,
        /// Raw telemetry topic to replay (name as on the cluster, prefix included); read by
        /// manual assignment, so no consumer group moves.
        #[arg(long, value_name = "NAME")]
        topic: Option<String>,
        /// With --topic: start at this time (RFC 3339 or epoch) ...
        #[arg(
            long,
            value_name = "TIME",
            requires = "topic",
            conflicts_with = "from_offset"
        )]
        from: Option<String>,
        /// ... or at this offset on every partition [default: each partition's first].
        #[arg(long, value_name = "N", requires = "topic")]
        from_offset: Option<i64>,
        /// With --topic: stop before this time ...
        #[arg(
            long,
            value_name = "TIME",
            requires = "topic",
            conflicts_with = "until_offset"
        )]
        until: Option<String>,
        /// ... or before this offset on every partition [default: each partition's end now].
        #[arg(long, value_name = "N", requires = "topic")]
        until_offset: Option<i64>,
        /// Column holding the time (RFC 3339, epoch, or naive UTC).
        #[arg(long, default_value = "timestamp")]
        time_column: String,
        /// Column holding the request rate.
        #[arg(long, default_value = "value")]
        value_column: String,
        /// Folder for the report (or, for --topic, the outputs) and the config used.
        #[arg(long, value_name = "DIR")]
        report: PathBuf,
        /// With --topic: also write the outputs to topics named PREFIX + their usual names
        /// (created if missing), never to the live ones.
        #[arg(long, value_name = "PREFIX", requires = "topic")]
        to_topics: Option<String>,
        /// Print the report (or the topic replay's summary) as JSON on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Send synthetic telemetry to a cluster.
    Produce {
        /// Use the built-in synthetic fleet (the only source for now).
        #[arg(long)]
        synthetic: bool,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Wire format; avro registers the raw schema with the registry first.
        #[arg(long, value_enum, default_value_t = FormatArg::Json)]
        format: FormatArg,
        /// Send as fast as possible with event times `demo.interval` apart (a backfill),
        /// instead of one round per `demo.interval` of wall time.
        #[arg(long)]
        fast: bool,
    },
    /// Topics as code.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Avro schemas of every topic.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Query the windows of a running `ebb demo` or `ebb run` with SQL (read-only).
    Sql {
        /// The query, e.g. "SELECT service, window_start, p95 FROM windows LIMIT 5".
        query: String,
        /// The ebb HTTP endpoint [default: http://<http.listen>, i.e. http://127.0.0.1:9470].
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = SqlFormat::Table)]
        format: SqlFormat,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Measure the models on recorded, labelled data (online, no peeking ahead).
    Eval {
        #[command(subcommand)]
        what: EvalWhat,
    },
}

#[derive(Subcommand, Debug)]
enum EvalWhat {
    /// Run the anomaly detectors over a NAB-layout folder and score them with NAB's rules.
    Anomalies {
        /// A folder laid out like NAB's data/: <category>/<file>.csv (timestamp,value) with
        /// combined_windows.json beside the categories, beside the folder, or in a labels/
        /// folder beside it (a NAB checkout's root works too).
        #[arg(long, value_name = "DIR")]
        nab: PathBuf,
        /// Also write per-row scores in NAB's results layout under DIR (for NAB's scorer).
        #[arg(long, value_name = "DIR")]
        nab_results: Option<PathBuf>,
        /// End with one JSON line of the figures.
        #[arg(long)]
        json: bool,
    },
    /// Forecast a recorded series online and compare with the naive forecasts.
    Forecast {
        /// The CSV file.
        #[arg(long, value_name = "CSV")]
        file: PathBuf,
        /// The time column.
        #[arg(long, default_value = "timestamp")]
        time_column: String,
        /// The value column.
        #[arg(long, default_value = "value")]
        value_column: String,
        /// End with one JSON line of the figures.
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StageName {
    /// The filter stage.
    Filter,
    /// The window stage (and SQL over its windows).
    Window,
    /// The models stage: anomalies and forecasts.
    Models,
    /// The decide stage: scale and restart commands, in Kafka transactions.
    Decide,
    /// Every stage (filter, window, models, decide), in one process.
    All,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DriverName {
    /// Print each command with its reason.
    Log,
    /// POST each command as signed JSON to `--url` (or actuate.webhook.url).
    Webhook,
    /// Patch Deployment/StatefulSet scales and delete pods (actuate.kubernetes).
    Kubernetes,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FormatArg {
    /// The contract JSON object.
    Json,
    /// Avro in the Confluent wire format (needs --registry).
    Avro,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SqlFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header line.
    Csv,
    /// The server's JSON answer (columns, rows, row_count, truncated).
    Json,
}

#[derive(Subcommand, Debug)]
enum TopicsAction {
    /// Create or update the declared topics; print what changed.
    Apply {
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the declared topics.
    List,
}

#[derive(Subcommand, Debug)]
enum SchemasAction {
    /// Check compatibility and register every topic's value schema.
    Register,
    /// Print the subjects and schemas.
    List,
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Validate the configuration and print it (secrets redacted).
    Check,
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// Window close to committed command, through the transactional decide stage on the
    /// mock cluster: p50/p99 latency for many services.
    Decide {
        /// Services.
        #[arg(long, default_value_t = 1_000)]
        services: usize,
        /// Windows timed (each gives every service a command).
        #[arg(long, default_value_t = 20)]
        windows: usize,
    },
    /// One round of model updates for many services on one core, state per service, and
    /// River's k-means on the same features.
    Models {
        /// Services.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Windows each service sees before the timed round.
        #[arg(long, default_value_t = 240)]
        warm: usize,
        /// A Python with River installed (compose/bench.sh models makes one).
        #[arg(long, value_name = "PATH")]
        python: Option<String>,
    },
    /// Window aggregation rate for many series, and DuckDB's rate on the same Arrow data.
    Window {
        /// Distinct (service, metric) series.
        #[arg(long, default_value_t = 10_000)]
        series: u64,
        /// Samples in all.
        #[arg(long, default_value_t = 2_000_000)]
        records: u64,
        /// Python with the duckdb and pyarrow packages (compose/bench.sh window sets one up).
        #[arg(long, value_name = "PATH")]
        python: Option<PathBuf>,
    },
    /// Replay speed: the whole pipeline (filter, window, models, decide) on a simulated
    /// clock for a synthetic fleet, one core; records/s and simulated time per wall time.
    Replay {
        /// Services (one instance each, five metrics).
        #[arg(long, default_value_t = 1_000)]
        services: usize,
        /// Simulated hours.
        #[arg(long, default_value_t = 24.0)]
        hours: f64,
        /// Time between a metric's samples.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Filter throughput in-process (JSON, Avro) and through a broker vs raw consume.
    Filter {
        /// Records per measurement.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
    },
}

fn load_config(cli: &Cli) -> Result<Config> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut config = Config::load(cli.config.as_deref(), &env)?;
    if let Some(b) = &cli.brokers {
        config.set_brokers(b);
    }
    if let Some(r) = &cli.registry {
        config.registry.url = Some(r.clone());
    }
    config.validate()?;
    Ok(config)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ebb: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebb: {}", render_error(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: most of ebb's errors already
/// name their cause in their own message, and repeating it reads as two failures.
fn render_error(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn dispatch(cli: Cli) -> Result<()> {
    let mut config = load_config(&cli)?;
    match cli.command {
        Command::Demo {
            duration,
            json,
            http,
        } => {
            if let Some(h) = http {
                config.http.listen = h;
                config.validate()?;
            }
            let mut stderr = std::io::stderr();
            let report = demo::run(config, duration, shutdown_signal(), &mut stderr).await?;
            let mut stdout = std::io::stdout();
            if json {
                writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
            } else {
                writeln!(
                    stdout,
                    "filter: {} in, {} out, {} dead-lettered",
                    report.records_in,
                    report.out,
                    report.dead_lettered.values().sum::<u64>()
                )?;
                for (reason, n) in &report.dead_lettered {
                    writeln!(stdout, "  {reason:<20} {n}")?;
                }
            }
            Ok(())
        }
        Command::Run { stage, http } => {
            if let Some(h) = http {
                config.http.listen = h;
                config.validate()?;
            }
            let stages: &[StageName] = match stage {
                StageName::All => &[
                    StageName::Filter,
                    StageName::Window,
                    StageName::Models,
                    StageName::Decide,
                ],
                StageName::Filter => &[StageName::Filter],
                StageName::Window => &[StageName::Window],
                StageName::Models => &[StageName::Models],
                StageName::Decide => &[StageName::Decide],
            };
            run_stages(config, stages).await
        }
        Command::Replay {
            file,
            topic,
            from,
            from_offset,
            until,
            until_offset,
            time_column,
            value_column,
            report,
            to_topics,
            json,
        } => {
            let config_toml = match cli
                .config
                .clone()
                .or_else(|| std::env::var_os("EBB_CONFIG").map(PathBuf::from))
            {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("{}: cannot read", path.display()))?,
                None => format!(
                    "# ebb {} built-in defaults: `ebb replay` ran with no config file.\n",
                    env!("CARGO_PKG_VERSION")
                ),
            };
            if let Some(topic) = topic {
                let bound = |time: Option<String>, offset: Option<i64>, flag: &str| {
                    use ebb::replay::topic::Bound;
                    match (time, offset) {
                        (Some(t), _) => ebb::eval::series::parse_time(&t)
                            .map(Bound::Time)
                            .with_context(|| format!("--{flag} {t}: not a time")),
                        (None, Some(o)) => Ok(Bound::Offset(o)),
                        (None, None) => Ok(Bound::Edge),
                    }
                };
                let range = ebb::replay::topic::TopicRange {
                    topic,
                    from: bound(from, from_offset, "from")?,
                    until: bound(until, until_offset, "until")?,
                };
                if to_topics.as_deref().is_some_and(str::is_empty) {
                    bail!(
                        "--to-topics needs a non-empty prefix: replay never writes to live topics"
                    );
                }
                return replay_topic(config, config_toml, range, report, to_topics, json).await;
            }
            let Some(file) = file else {
                bail!("ebb replay needs --file or --topic");
            };
            let job = ebb::replay::FileJob {
                file,
                time_column,
                value_column,
                report,
            };
            let progress = indicatif::ProgressBar::new_spinner();
            progress.set_message(format!("replaying {}", job.file.display()));
            progress.enable_steady_tick(Duration::from_millis(120));
            let started = std::time::Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                ebb::replay::replay_file(&config, &config_toml, &job).map(|r| (r, job))
            })
            .await?;
            progress.finish_and_clear();
            let (report, job) = result?;
            let mut stdout = std::io::stdout();
            writeln!(
                stdout,
                "{}: {} rows, {:.0} simulated minutes in {:.2} s; report in {}",
                report.input.file,
                report.input.rows,
                report.input.minutes,
                started.elapsed().as_secs_f64(),
                job.report.display()
            )?;
            if let Some(line) = report.input.first_missing_line {
                writeln!(
                    stdout,
                    "{} rows held no value (the first on line {line}): skipped as gaps",
                    report.input.missing_values
                )?;
            }
            if let Some(at) = &report.input.first_negative_at {
                writeln!(
                    stdout,
                    "{} rows held a negative request rate (the first at {at}): replayed as zero",
                    report.input.negative_values
                )?;
            }
            report.summary(&mut stdout)?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
            }
            Ok(())
        }
        Command::Actuate {
            driver,
            dry_run,
            url,
            http,
        } => {
            if let Some(h) = http {
                config.http.listen = h;
            }
            if let Some(u) = url {
                config.actuate.webhook.url = Some(u);
            }
            config.validate()?;
            actuate(config, driver, dry_run).await
        }
        Command::Produce {
            synthetic,
            count,
            duration,
            format,
            fast,
        } => {
            if !synthetic {
                bail!("only --synthetic is supported: say `ebb produce --synthetic`");
            }
            produce(config, count, duration, format, fast).await
        }
        Command::Topics { action } => {
            let specs = topics::declared(&config)?;
            match action {
                TopicsAction::List => {
                    for s in &specs {
                        println!(
                            "{:<32} partitions {:>2}  replication {}  {}",
                            s.name,
                            s.partitions,
                            s.replication,
                            s.doc.as_deref().unwrap_or("")
                        );
                    }
                    Ok(())
                }
                TopicsAction::Apply { dry_run } => {
                    let report = topics::apply(&config.kafka, &specs, dry_run)
                        .await
                        .with_context(|| format!("applying topics on {}", config.brokers()))?;
                    for (topic, changes) in report {
                        for c in changes {
                            println!("{topic:<32} {c}");
                        }
                    }
                    Ok(())
                }
            }
        }
        Command::Schemas { action } => {
            let list = schemas::topic_schemas(&config.topics);
            match action {
                SchemasAction::List => {
                    for s in &list {
                        println!("{}\n{}", s.subject(), s.schema);
                    }
                    Ok(())
                }
                SchemasAction::Register => {
                    let Some(registry) = wiring::registry(&config)? else {
                        bail!("no schema registry: pass --registry URL or set registry.url / EBB_REGISTRY_URL");
                    };
                    for r in schemas::register_all(&registry, &list).await? {
                        println!("{:<40} id {:>4}  {}", r.subject, r.id, r.compatibility);
                    }
                    Ok(())
                }
            }
        }
        Command::Sql { query, url, format } => {
            let url = url.unwrap_or_else(|| format!("http://{}", config.http.listen));
            sql_client(&url, &query, format).await
        }
        Command::Config {
            action: ConfigAction::Check,
        } => {
            println!("{config:#?}");
            println!("config ok");
            Ok(())
        }
        Command::Bench {
            what:
                BenchWhat::Window {
                    series,
                    records,
                    python,
                },
        } => {
            let f = tokio::task::spawn_blocking(move || {
                ebb::bench_window::window(series, records, python.as_deref())
            })
            .await??;
            println!(
                "window benchmark: {} series, {} samples, {} s tumbling windows, one core",
                f.series, f.records, f.window_s
            );
            println!(
                "  ebb window stage (buffer + watermark + DataFusion)  {:>12.0} records/s  ({} windows)",
                f.ebb_records_per_s, f.windows
            );
            match (f.duckdb_records_per_s, f.ratio) {
                (Some(d), Some(r)) => {
                    println!(
                        "  DuckDB, same aggregates, one thread, batch query  {d:>12.0} records/s"
                    );
                    println!("  ebb / DuckDB                                      {r:>12.2}x");
                }
                _ => println!(
                    "  DuckDB: {}",
                    f.duckdb_error.as_deref().unwrap_or("not run")
                ),
            }
            println!(
                "  memory per open series beyond buffered samples    {:>12.0} bytes  (over {} series)",
                f.bytes_per_open_series, f.memory_series
            );
            println!(
                "  memory per buffered sample                        {:>12.0} bytes",
                f.bytes_per_buffered_record
            );
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Command::Eval {
            what:
                EvalWhat::Anomalies {
                    nab,
                    nab_results,
                    json,
                },
        } => {
            let detector = config.models.detector.clone();
            let score = tokio::task::spawn_blocking(move || {
                ebb::eval::anomalies(&nab, nab_results.as_deref(), &detector)
            })
            .await??;
            print_anomaly_table(&score);
            if json {
                println!("{}", serde_json::to_string(&score)?);
            }
            Ok(())
        }
        Command::Eval {
            what:
                EvalWhat::Forecast {
                    file,
                    time_column,
                    value_column,
                    json,
                },
        } => {
            let forecast = config.models.forecast.clone();
            let (score, name) = tokio::task::spawn_blocking(move || {
                let series = ebb::eval::series::read_series(
                    &file,
                    &time_column,
                    &value_column,
                    ebb::eval::series::ReadMode::Gaps,
                )?;
                let score = ebb::eval::forecast::evaluate(&series, &forecast);
                Ok::<_, ebb::eval::EvalError>((score, file.display().to_string()))
            })
            .await??;
            println!("{name}: {} rows, step {} s", score.rows, score.step_seconds);
            if score.missing_values > 0 {
                println!(
                    "  {} rows held no value and were skipped as gaps",
                    score.missing_values
                );
            }
            println!(
                "  {:>8} {:>8} {:>12} {:>9} {:>12} {:>12} {:>14} {:>9}",
                "horizon",
                "n",
                "mae",
                "mape",
                "mae_last",
                "skill_last",
                "skill_yesterday",
                "coverage"
            );
            for e in &score.horizons {
                println!(
                    "  {:>8} {:>8} {:>12.4} {:>9.4} {:>12.4} {:>+12.3} {:>+14.3} {:>9.2}",
                    e.horizon,
                    e.n,
                    e.mae,
                    e.mape,
                    e.mae_last,
                    e.skill_vs_last,
                    e.skill_vs_yesterday,
                    e.interval_coverage
                );
            }
            if score.horizons.iter().any(|e| e.n == 0) {
                println!(
                    "  a forecast is scored only when its target and the same time a day before it are both rows: \
                     horizons with n = 0 had none, so their figures are undefined (null in --json)"
                );
            }
            if json {
                println!("{}", serde_json::to_string(&forecast_json(&score))?);
            }
            Ok(())
        }
        Command::Bench {
            what:
                BenchWhat::Models {
                    services,
                    warm,
                    python,
                },
        } => {
            let f = tokio::task::spawn_blocking(move || {
                ebb::bench_models::models(services, warm, python.as_deref())
            })
            .await?;
            println!(
                "models benchmark: {} services, one window each after {} warm-up windows, one core",
                f.services, f.warm_windows
            );
            println!(
                "  full round (k-means + DBSCAN + 2 forecasters)  {:>9.3} s  ({:.0} updates/s)",
                f.round_s, f.updates_per_s
            );
            println!(
                "  detector round (k-means + DBSCAN)              {:>9.3} s",
                f.detector_round_s
            );
            println!(
                "  model state per service (counted)              {:>9.0} B   (largest {} B)",
                f.state_bytes_per_service, f.max_state_bytes
            );
            println!(
                "  memory per service (resident growth)           {:>9.0} B   (snapshot {:.0} B)",
                f.bytes_per_service, f.snapshot_bytes_per_service
            );
            match (f.river_updates_per_s, f.ratio_vs_river) {
                (Some(r), Some(x)) => {
                    println!("  River k-means, same features                   {r:>9.0} updates/s");
                    println!("  ebb detector / River                           {x:>9.1}x");
                }
                _ => println!("  River: {}", f.river_error.as_deref().unwrap_or("not run")),
            }
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Command::Bench {
            what: BenchWhat::Decide { services, windows },
        } => {
            let f = tokio::task::spawn_blocking(move || {
                ebb::bench_decide::run(services, windows, Duration::from_millis(500))
            })
            .await??;
            println!(
                "decide benchmark: {} services, {} windows, {} commands timed (mock cluster, transactions)",
                f.services, f.windows, f.commands
            );
            println!(
                "  window close -> committed command   p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
                f.p50_ms, f.p99_ms, f.max_ms
            );
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Command::Bench {
            what:
                BenchWhat::Replay {
                    services,
                    hours,
                    interval,
                },
        } => {
            let f = tokio::task::spawn_blocking(move || {
                ebb::bench_replay::run(services, hours, interval, 6)
            })
            .await??;
            println!(
                "replay benchmark: {} services x {:.1} simulated hours, a sample per metric every {} s, one core",
                f.services, f.simulated_hours, f.interval_s
            );
            println!(
                "  {} records in {:.1} s: {:.0} records/s, {:.0}x real time; {} aggregates, {} commands; peak RSS {}",
                f.records,
                f.wall_s,
                f.records_per_s,
                f.simulated_per_wall,
                f.aggregates,
                f.commands,
                f.peak_rss_mib
                    .map_or_else(|| "unknown".to_string(), |m| format!("{m:.0} MiB"))
            );
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Command::Bench {
            what: BenchWhat::Filter { records },
        } => {
            let config = load_config(&cli)?;
            let figures = tokio::task::spawn_blocking(move || {
                bench::filter(&config, records, cli.brokers.as_deref())
            })
            .await??;
            println!("filter benchmark, {} records, one core", figures.records);
            println!(
                "  in-process JSON  decode+filter+encode  {:>12.0} records/s",
                figures.json_records_per_s
            );
            println!(
                "  in-process Avro  decode+filter+encode  {:>12.0} records/s",
                figures.avro_records_per_s
            );
            println!(
                "  broker: {} ({} records held)",
                figures.broker, figures.broker_records
            );
            println!(
                "  raw rdkafka consume                    {:>12.0} records/s",
                figures.raw_consume_records_per_s
            );
            println!(
                "  filter stage through the runner        {:>12.0} records/s",
                figures.filter_records_per_s
            );
            println!(
                "  pass-through stage through the runner  {:>12.0} records/s",
                figures.passthrough_records_per_s
            );
            println!(
                "  filter / raw consume                   {:>12.3}",
                figures.ratio
            );
            println!("{}", serde_json::to_string(&figures)?);
            Ok(())
        }
    }
}

/// The HTTP listener `http.listen` asks for, or an error naming the key.
async fn bind_http(config: &Config) -> Result<Option<tokio::net::TcpListener>> {
    wiring::bind_http(config).await.with_context(|| {
        format!(
            "http.listen {}: cannot listen (use --http ADDR:PORT)",
            config.http.listen
        )
    })
}

/// Runs `stages` against the configured cluster, each on its own thread, until a signal
/// or until one of them stops.
async fn run_stages(config: Config, stages: &[StageName]) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let shutdown = Arc::new(AtomicBool::new(false));
    let listener = bind_http(&config).await?;
    let key = wiring::anonymization_key(&config, rand::random);
    let handle = tokio::runtime::Handle::current();
    // The SQL tables live with the stages that fill them: windows, anomalies and forecasts,
    // commands. A table whose stage runs elsewhere is there, and empty.
    let with_sql = stages.contains(&StageName::Window)
        || stages.contains(&StageName::Models)
        || stages.contains(&StageName::Decide);
    let sql = if with_sql {
        Some(wiring::sql(&config, Some(&key))?)
    } else {
        None
    };
    let store = sql.as_ref().map(|s| s.windows.clone());
    let commands_store = sql.as_ref().map(|s| s.commands.clone());
    let model_tables = sql.as_ref().map(|s| s.models.clone());
    let engine = sql.as_ref().map(|s| s.engine.clone());
    let _pg = match (&engine, config.sql.pg_enabled) {
        (Some(engine), true) => {
            let addr = config.sql.pg_listen.parse()?;
            Some(
                ebb::sql::pg::serve(engine.clone(), addr)
                    .await
                    .with_context(|| format!("sql.pg_listen {addr}: cannot listen"))?,
            )
        }
        _ => None,
    };
    let http = listener.map(|l| wiring::serve_http(l, metrics.clone(), engine.clone()));
    let mut workers = Vec::new();
    for stage in stages {
        let worker = match stage {
            StageName::Filter => {
                let (stage, ctx) = wiring::filter(
                    &config,
                    &key,
                    metrics.clone(),
                    clock.clone(),
                    shutdown.clone(),
                    handle.clone(),
                )?;
                runner::spawn(stage, ctx)?
            }
            StageName::Window => {
                let (stage, ctx) = wiring::window(
                    &config,
                    metrics.clone(),
                    clock.clone(),
                    shutdown.clone(),
                    handle.clone(),
                    store.clone(),
                )?;
                runner::spawn(stage, ctx)?
            }
            StageName::Models => {
                let (stage, ctx) = wiring::models(
                    &config,
                    metrics.clone(),
                    clock.clone(),
                    shutdown.clone(),
                    handle.clone(),
                    model_tables.clone(),
                )?;
                runner::spawn(stage, ctx)?
            }
            StageName::Decide => {
                let (stage, ctx) = wiring::decide(
                    &config,
                    metrics.clone(),
                    clock.clone(),
                    shutdown.clone(),
                    handle.clone(),
                    commands_store.clone(),
                )?;
                runner::spawn_transactional(stage, ctx, config.decide.transactional_id.clone())?
            }
            StageName::All => continue,
        };
        workers.push((*stage, worker));
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(workers.len().max(1));
    let mut waiters = Vec::new();
    for (name, worker) in workers {
        let done = done_tx.clone();
        waiters.push(tokio::task::spawn_blocking(move || {
            let r = worker.join();
            let _ = done.try_send(());
            (name, r)
        }));
    }
    tokio::select! {
        () = shutdown_signal() => info!("stopping: finishing the batches in flight and committing"),
        _ = done_rx.recv() => {},
    }
    shutdown.store(true, Ordering::Relaxed);
    let mut failed = None;
    for w in waiters {
        let (name, joined) = w.await?;
        match joined {
            Err(_) => failed = Some(anyhow::anyhow!("the {name:?} thread panicked")),
            Ok(Err(e)) => failed = Some(anyhow::anyhow!("{name:?}: {e}")),
            Ok(Ok(summary)) => info!(
                stage = ?name,
                consumed = summary.consumed,
                emitted = summary.emitted,
                dead_lettered = summary.dead_lettered,
                "stage stopped"
            ),
        }
    }
    drop(http);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `ebb actuate`: one actuator over the chosen driver until a signal.
async fn actuate(config: Config, driver: DriverName, dry_run: bool) -> Result<()> {
    use ebb::actuators::{kubernetes, log, webhook, Driver};
    let handle = tokio::runtime::Handle::current();
    let driver: Box<dyn Driver> = match driver {
        DriverName::Log => Box::new(log::LogDriver::stdout()),
        DriverName::Webhook => {
            let Some(url) = config.actuate.webhook.url.clone() else {
                bail!("the webhook driver needs --url or actuate.webhook.url");
            };
            Box::new(webhook::WebhookDriver::new(
                url,
                &config.actuate.webhook,
                handle.clone(),
            )?)
        }
        DriverName::Kubernetes => {
            // Pseudonymised instances are matched to pods with the filter's key.
            let key = config
                .filter
                .anonymize
                .fields
                .iter()
                .any(|f| f == "instance")
                .then(|| {
                    config
                        .filter
                        .anonymize
                        .key
                        .as_ref()
                        .map(|k| k.expose().to_vec())
                })
                .flatten();
            Box::new(
                kubernetes::KubernetesDriver::new(
                    &config.actuate.kubernetes,
                    key.as_deref(),
                    handle.clone(),
                )
                .await?,
            )
        }
    };
    let metrics = Arc::new(Metrics::new());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let shutdown = Arc::new(AtomicBool::new(false));
    let listener = bind_http(&config).await?;
    let http = listener.map(|l| wiring::serve_http(l, metrics.clone(), None));
    let (stage, ctx) = wiring::actuator(
        &config,
        driver,
        dry_run,
        metrics,
        clock,
        shutdown.clone(),
        handle.clone(),
    )?;
    let worker = runner::spawn(stage, ctx)?;
    let joined = tokio::task::spawn_blocking(move || worker.join());
    tokio::pin!(joined);
    let result = tokio::select! {
        () = shutdown_signal() => {
            info!("stopping: finishing the commands in flight and committing");
            shutdown.store(true, Ordering::Relaxed);
            joined.await?
        }
        r = &mut joined => r?,
    };
    drop(http);
    match result {
        Err(_) => bail!("the actuator thread panicked"),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `ebb sql`: posts the query and prints the answer.
async fn sql_client(url: &str, query: &str, format: SqlFormat) -> Result<()> {
    let endpoint = format!("{}/sql", url.trim_end_matches('/'));
    let wire = match format {
        SqlFormat::Table => "arrow",
        SqlFormat::Csv => "csv",
        SqlFormat::Json => "json",
    };
    let response = reqwest::Client::new()
        .post(format!("{endpoint}?format={wire}"))
        .header("content-type", "text/plain")
        .body(query.to_string())
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .with_context(|| format!("cannot reach {endpoint}: is `ebb demo` or `ebb run` up?"))?;
    let status = response.status();
    let truncated = response
        .headers()
        .get("x-ebb-truncated")
        .is_some_and(|v| v.as_bytes() == b"true");
    let body = response.bytes().await?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{message}");
    }
    let mut stdout = std::io::stdout();
    match format {
        SqlFormat::Csv | SqlFormat::Json => {
            stdout.write_all(&body)?;
            if !body.ends_with(b"\n") {
                writeln!(stdout)?;
            }
        }
        SqlFormat::Table => {
            let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(
                std::io::Cursor::new(body.to_vec()),
                None,
            )?;
            let batches = reader.collect::<Result<Vec<_>, _>>()?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            writeln!(
                stdout,
                "{}",
                datafusion::arrow::util::pretty::pretty_format_batches(&batches)?
            )?;
            writeln!(stdout, "({rows} row{})", if rows == 1 { "" } else { "s" })?;
        }
    }
    if truncated {
        eprintln!("ebb: result cut at sql.max_rows");
    }
    Ok(())
}

async fn produce(
    config: Config,
    count: Option<u64>,
    duration: Option<Duration>,
    format: FormatArg,
    fast: bool,
) -> Result<()> {
    let wire = match format {
        FormatArg::Json => WireFormat::Json,
        FormatArg::Avro => {
            let Some(registry) = wiring::registry(&config)? else {
                bail!("--format avro needs a schema registry: pass --registry URL or set EBB_REGISTRY_URL");
            };
            let raw = schemas::topic_schemas(&config.topics)
                .into_iter()
                .next()
                .context("raw schema")?;
            WireFormat::Avro(
                registry
                    .register(&raw.subject(), raw.schema)
                    .await
                    .context("registering the raw schema")?,
            )
        }
    };
    let job = ProduceJob {
        kafka: config.kafka.clone(),
        topic: config.topics.name(&config.topics.raw),
        pace: if fast {
            Pace::Fast(config.demo.interval)
        } else {
            Pace::RealTime(config.demo.interval)
        },
        max_records: count,
    };
    let generator = Generator::new(config.demo.generator(), wire);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(ProduceCounts::default());
    let worker = {
        let (stop, counts) = (stop.clone(), counts.clone());
        tokio::task::spawn_blocking(move || {
            demo::produce(&job, generator, &SystemClock, &stop, &counts)
        })
    };
    let limit = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(worker);
    tokio::select! {
        r = &mut worker => { r??; }
        () = limit => { stop.store(true, Ordering::Relaxed); worker.await??; }
        () = shutdown_signal() => { stop.store(true, Ordering::Relaxed); worker.await??; }
    }
    let injected = counts
        .injected
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({ "produced": counts.produced.load(Ordering::Relaxed), "injected": injected })
    );
    Ok(())
}

/// The anomaly evaluation as a table: per file, then overall.
fn print_anomaly_table(score: &ebb::eval::nab::CorpusScore) {
    println!(
        "{:<58} {:>9} {:>9} {:>7} {:>7} {:>9}",
        "file", "score", "windows", "found", "FP", "precision"
    );
    for f in &score.files {
        let s = f
            .score_standard
            .map_or_else(|| "-".to_string(), |s| format!("{s:.2}"));
        println!(
            "{:<58} {:>9} {:>9} {:>7} {:>7} {:>9.3}",
            f.file, s, f.tally.windows, f.tally.windows_detected, f.tally.fp, f.precision
        );
    }
    println!(
        "overall: NAB standard score {:.2} (threshold {:.6}), precision {:.3}, recall {:.3} over {} files",
        score.score_standard,
        score.threshold,
        score.precision,
        score.recall,
        score.files.len()
    );
}

/// The forecast evaluation's contract line: the per-horizon table, and the headline figures
/// keyed by horizon at the top level.
fn forecast_json(score: &ebb::eval::forecast::ForecastScore) -> serde_json::Value {
    let per = |f: fn(&ebb::eval::forecast::HorizonError) -> f64| {
        score
            .horizons
            .iter()
            .map(|e| (e.horizon.clone(), serde_json::json!(f(e))))
            .collect::<serde_json::Map<_, _>>()
    };
    serde_json::json!({
        "rows": score.rows,
        "step_seconds": score.step_seconds,
        "mae": per(|e| e.mae),
        "mape": per(|e| e.mape),
        "skill_vs_last": per(|e| e.skill_vs_last),
        "skill_vs_yesterday": per(|e| e.skill_vs_yesterday),
        "horizons": score.horizons,
    })
}

/// `ebb replay --topic`: the whole pipeline over a recorded topic, with a progress bar.
async fn replay_topic(
    config: Config,
    config_toml: String,
    range: ebb::replay::topic::TopicRange,
    dir: PathBuf,
    to_topics: Option<String>,
    json: bool,
) -> Result<()> {
    if config.filter.anonymize.key.is_none() {
        tracing::warn!("EBB_ANON_KEY is not set: pseudonyms (and so restart commands' instances) will not match the live run's");
    }
    let key = wiring::anonymization_key(&config, rand::random);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} records, {per_sec}, ETA {eta}; simulated {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let handle = tokio::runtime::Handle::current();
    let (progress_bar, out) = (bar.clone(), dir.clone());
    let summary = tokio::task::spawn_blocking(move || {
        ebb::replay::topic::replay_topic(
            &config,
            &config_toml,
            &key,
            &range,
            &out,
            to_topics.as_deref(),
            handle,
            &mut |done, total, now| {
                progress_bar.set_length(total);
                progress_bar.set_position(done);
                if let Some(ms) = now {
                    progress_bar.set_message(ebb::stages::window::aggregate::ms_to_rfc3339(ms));
                }
            },
        )
    })
    .await??;
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let simulated_s = match (summary.counts.first_ms, summary.counts.last_ms) {
        (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
        _ => 0.0,
    };
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "{}: {} records, {:.0} simulated seconds in {:.2} s ({:.0} records/s, {:.0}x real time); outputs in {}",
        summary.topic,
        summary.counts.records,
        simulated_s,
        wall,
        summary.counts.records as f64 / wall.max(1e-9),
        simulated_s / wall.max(1e-9),
        dir.display()
    )?;
    writeln!(
        stdout,
        "commands {:?}, outputs {:?}, dead letters {:?}",
        summary.counts.commands, summary.counts.outputs, summary.counts.dead_letters
    )?;
    if !summary.policies.is_empty() {
        writeln!(
            stdout,
            "{:<24} {:>22} {:>22}   (on each service's recorded load)",
            "service", "SLA-violation min", "replica-min"
        )?;
        writeln!(
            stdout,
            "{:<24} {:>7} {:>7} {:>6} {:>8} {:>8} {:>6}",
            "", "ebb", "hpa", "oracle", "ebb", "hpa", "oracle"
        )?;
        for (service, p) in &summary.policies {
            let get = |name: &str| p.get(name).cloned().unwrap_or_default();
            let (e, h, o) = (get("ebb"), get("hpa"), get("oracle"));
            writeln!(
                stdout,
                "{:<24} {:>7.1} {:>7.1} {:>6.1} {:>8.0} {:>8.0} {:>6.0}",
                service,
                e.sla_violation_minutes,
                h.sla_violation_minutes,
                o.sla_violation_minutes,
                e.replica_minutes,
                h.replica_minutes,
                o.replica_minutes
            )?;
        }
        let v = &summary.verdict;
        writeln!(
            stdout,
            "fleet: ebb vs hpa violations x{:.2}, cost x{:.2}; fewer violations at no more cost on {} of {} services; report in {}",
            v.violation_ratio,
            v.cost_ratio,
            summary.services_better_than_hpa,
            summary.policies.len(),
            dir.join("report.md").display()
        )?;
    }
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&summary)?)?;
    }
    Ok(())
}
