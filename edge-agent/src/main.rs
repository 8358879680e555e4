//! `edge-agent`: see README.md and docs/configuration.md.

use clap::{Parser, Subcommand, ValueEnum};
use edge_agent::config::Config;
use edge_agent::store::tools::{self, Format};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Whether this build can run an anomaly model (one built with
/// --no-default-features cannot): operators and the board tests ask.
#[cfg(feature = "tflite")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (TF Lite runtime: on-device anomaly detection)");
#[cfg(not(feature = "tflite"))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (no TF Lite runtime: no on-device anomaly detection)");

/// The command line, one definition: parsing and help.
#[derive(Parser)]
#[command(
    name = "edge-agent",
    version = VERSION,
    about = "The edge agent: probes, windows, store, anomaly model, uplink (README.md).",
    after_help = "Without --config the built-in defaults are used (docs/configuration.md).\n\
                  Logging: EDGE_AGENT_LOG=debug (tracing EnvFilter syntax)."
)]
struct Cli {
    /// The configuration file (TOML)
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default without a command)
    Run,
    /// Check the configuration and the TLS and password files it names
    CheckConfig,
    /// Attach every enabled probe, report each, detach
    Probes,
    /// Read the store (safe next to a running agent: only reads)
    #[command(subcommand)]
    Store(StoreCommand),
    /// Anomaly models
    #[command(subcommand)]
    Model(ModelCommand),
    /// Process values: tags
    #[command(subcommand)]
    Tags(TagsCommand),
    /// Probe program packs (docs/probes.md, "New programs without a new agent")
    #[command(subcommand)]
    Programs(ProgramsCommand),
}

#[derive(Subcommand)]
enum ProgramsCommand {
    /// Write the probes' built-in kernel objects (<name>.bpf.o) into DIR
    Export { dir: PathBuf },
    /// Make a signed pack of the <name>.bpf.o files in DIR
    Pack {
        /// The Ed25519 signing key (PEM, PKCS#8: openssl genpkey -algorithm ed25519)
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        /// The pack's version (said in the audit trail)
        #[arg(long, value_name = "V")]
        version: String,
        /// Where the pack goes
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Segments, records, lanes, what was dropped and why
    Inspect {
        /// The store directory (default: the configuration's)
        #[arg(long, value_name = "STORE_DIR")]
        dir: Option<PathBuf>,
    },
    /// The audit trail's records the box holds, checked link by link
    Audit {
        /// The store directory (default: the configuration's)
        #[arg(long, value_name = "STORE_DIR")]
        dir: Option<PathBuf>,
    },
    /// The stored samples or windows, in a time range
    #[command(after_help = "TIME: 2026-11-21T10:00:00Z, Unix seconds, or relative: -2h, -30m, -7d.")]
    Export {
        /// The store directory (default: the configuration's)
        #[arg(long, value_name = "STORE_DIR")]
        dir: Option<PathBuf>,
        /// Only from this time on
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Only up to this time
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Openmetrics)]
        format: ExportFormat,
        /// Write here instead of standard output
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    /// OpenMetrics text, every sample with its timestamp
    Openmetrics,
    /// One sample per line
    Csv,
    /// One window per line, the model's features (model/run.sh train reads it)
    Features,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Load an anomaly model, run its golden self-test, print the verdict
    Check {
        /// The model card (default: detect.model)
        card: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TagsCommand {
    /// Watch Modbus/TCP and RTU traffic: which servers, units, tables and
    /// addresses are read and written, recent values under each plausible
    /// type and order; toml: a starting tag map
    Discover {
        /// How long to watch
        #[arg(long, default_value_t = 30, value_name = "N")]
        seconds: u64,
        #[arg(long, value_enum, default_value_t = DiscoverFormat::Text)]
        format: DiscoverFormat,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DiscoverFormat {
    Text,
    Toml,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edge_agent::init_logging("EDGE_AGENT_LOG");
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(2, &e.to_string()),
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => match edge_agent::run(cfg, cli.config.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                fail(1, &e.to_string())
            }
        },
        Command::Programs(ProgramsCommand::Export { dir }) => {
            let written = std::fs::create_dir_all(&dir).and_then(|_| {
                for name in edge_agent::probe::objects::NAMES {
                    let object = edge_agent::probe::objects::built_in(name).unwrap_or_default();
                    std::fs::write(dir.join(format!("{name}.bpf.o")), object)?;
                }
                Ok(())
            });
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, &format!("{}: {e}", dir.display())),
            }
        }
        Command::Programs(ProgramsCommand::Pack { key, version, out, dir }) => {
            use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
            let der = match PrivatePkcs8KeyDer::from_pem_file(&key) {
                Ok(d) => d,
                Err(e) => return fail(2, &format!("{}: no PKCS#8 private key ({e:?})", key.display())),
            };
            let mut objects = Vec::new();
            for name in edge_agent::probe::objects::NAMES {
                if let Ok(bytes) = std::fs::read(dir.join(format!("{name}.bpf.o"))) {
                    objects.push((name, bytes));
                }
            }
            if objects.is_empty() {
                return fail(
                    2,
                    &format!("{}: no <probe>.bpf.o of {:?}", dir.display(), edge_agent::probe::objects::NAMES),
                );
            }
            let refs: Vec<(&str, &[u8])> = objects.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            match edge_agent::probe_programs::pack(&version, &refs, der.secret_pkcs8_der())
                .and_then(|p| std::fs::write(&out, p).map_err(|e| format!("{}: {e}", out.display())))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(2, &e),
            }
        }
        Command::Probes => {
            print!("{}", edge_agent::probe::report(&cfg));
            ExitCode::SUCCESS
        }
        Command::CheckConfig => {
            println!("device_id = {}", cfg.device_id);
            let m = &cfg.mqtt;
            let how = match (m.tls.enabled, m.tls.cert_file.as_os_str().is_empty()) {
                (false, _) => "plain TCP (no TLS)".to_string(),
                (true, true) => format!("TLS, CA {}", m.tls.ca_file.display()),
                (true, false) => {
                    format!("TLS, CA {}, client certificate {}", m.tls.ca_file.display(), m.tls.cert_file.display())
                }
            };
            println!("mqtt = {}:{}, {how}", m.host, m.port);
            // The files are read as the uplink will read them.
            let files = if m.tls.enabled { m.tls.client_config().map(drop) } else { Ok(()) };
            match files.and_then(|()| m.auth.load().map(drop)) {
                Ok(()) => {
                    println!("configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
        Command::Store(StoreCommand::Inspect { dir }) => {
            let dir = dir.unwrap_or_else(|| cfg.store_dir());
            match tools::inspect(&dir) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
        Command::Store(StoreCommand::Audit { dir }) => {
            let dir = dir.unwrap_or_else(|| cfg.store_dir());
            match tools::audit(&dir) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
        Command::Store(StoreCommand::Export { dir, from, to, format, output }) => {
            match export(&cfg, dir, (from.as_deref(), to.as_deref()), format, output.as_deref()) {
                Ok(n) => {
                    let what = if format == ExportFormat::Features { "windows" } else { "samples" };
                    eprintln!("edge-agent: exported {n} {what}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e),
            }
        }
        Command::Model(ModelCommand::Check { card }) => {
            let card = card.unwrap_or_else(|| cfg.detect.model.clone());
            let pin = Some(cfg.detect.model_sha256.as_str());
            match edge_agent::detect::Model::load(&card, pin) {
                Ok(m) => {
                    println!(
                        "{}: model {:?} sha256 {}, {} features, threshold {}, {} golden vectors reproduced on {}",
                        card.display(),
                        m.card.name,
                        m.sha256,
                        m.card.features.len(),
                        m.card.threshold,
                        m.card.golden.len(),
                        std::env::consts::ARCH
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
        Command::Tags(TagsCommand::Discover { seconds, format }) => {
            let toml = format == DiscoverFormat::Toml;
            eprintln!("edge-agent: watching Modbus traffic for {seconds} s");
            match edge_agent::values::discover_driver::discover(&cfg, seconds) {
                Ok(d) if toml => {
                    print!("{}", d.toml());
                    ExitCode::SUCCESS
                }
                Ok(d) => {
                    print!("{}", d.text());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &format!("{e} (run as root)")),
            }
        }
    }
}

fn export(
    cfg: &Config,
    dir: Option<PathBuf>,
    (from, to): (Option<&str>, Option<&str>),
    format: ExportFormat,
    output: Option<&Path>,
) -> Result<u64, String> {
    let now = edge_agent::now_ms();
    let from = from.map_or(Ok(i64::MIN), |t| tools::parse_time(t, now))?;
    let to = to.map_or(Ok(i64::MAX), |t| tools::parse_time(t, now))?;
    let format = match format {
        ExportFormat::Openmetrics => Format::OpenMetrics,
        ExportFormat::Csv => Format::Csv,
        ExportFormat::Features => Format::Features,
    };
    let dir = dir.unwrap_or_else(|| cfg.store_dir());
    let mut out: Box<dyn std::io::Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let n = tools::export(&dir, from, to, format, &mut *out).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| format!("cannot write the output: {e}"))?;
    Ok(n)
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("edge-agent: {msg}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_belong_to_their_commands() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["edge-agent"][..], args].concat());
        // Only the store's commands take --dir, only export takes --from.
        assert!(parse(&["run", "--from", "x"]).is_err());
        assert!(parse(&["probes", "--dir", "x"]).is_err());
        assert!(parse(&["store", "inspect", "--from", "x"]).is_err());
        // --config anywhere; no command runs the agent.
        let cli = parse(&["--config", "a.toml"]).unwrap();
        assert!(cli.config.is_some() && cli.command.is_none());
        let cli = parse(&["--config", "a.toml", "store", "export", "--format", "csv"]).unwrap();
        assert!(cli.config.is_some());
        assert!(matches!(cli.command, Some(Command::Store(StoreCommand::Export { format: ExportFormat::Csv, .. }))));
        let cli = parse(&["probes", "-c", "a.toml"]).unwrap();
        assert!(cli.config.is_some() && matches!(cli.command, Some(Command::Probes)));
        assert!(matches!(
            parse(&["tags", "discover"]).unwrap().command,
            Some(Command::Tags(TagsCommand::Discover { seconds: 30, format: DiscoverFormat::Text }))
        ));
        assert!(parse(&["tags", "discover", "--seconds", "ten"]).is_err());
        assert!(parse(&["store", "export", "--format", "json"]).is_err());
    }
}
