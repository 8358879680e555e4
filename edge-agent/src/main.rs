//! `edge-agent`: see README.md and docs/configuration.md.

use edge_agent::config::Config;
use edge_agent::tools::{self, Format};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: edge-agent [run] [--config FILE]
       edge-agent check-config [--config FILE]
       edge-agent probes [--config FILE]      attach every enabled probe, report each, detach
       edge-agent store inspect [--config FILE | --dir STORE_DIR]
       edge-agent store export  [--config FILE | --dir STORE_DIR]
                                [--from TIME] [--to TIME] [--format openmetrics|csv|features] [--output FILE]
       edge-agent model check [CARD] [--config FILE]   load an anomaly model, run its golden
                                                       self-test, print the verdict (default: detect.model)
       edge-agent tags discover [--seconds N] [--format text|toml] [--config FILE]
                                watch Modbus/TCP and RTU traffic for N s (default 30): which servers,
                                units, tables and addresses are read and written, recent values under
                                each plausible type and order; toml: a starting tag map
       edge-agent --version

Without --config the built-in defaults are used (docs/configuration.md).
TIME: 2026-11-21T10:00:00Z, Unix seconds, or relative: -2h, -30m, -7d.
The store commands only read: they are safe next to a running agent.
Logging: EDGE_AGENT_LOG=debug (tracing EnvFilter syntax).";

#[derive(Default)]
struct Args {
    command: Vec<String>,
    config: Option<PathBuf>,
    dir: Option<PathBuf>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
    output: Option<PathBuf>,
    seconds: Option<u64>,
}

fn parse() -> Result<Option<Args>, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--config" | "-c" => a.config = Some(PathBuf::from(value("--config")?)),
            "--dir" => a.dir = Some(PathBuf::from(value("--dir")?)),
            "--from" => a.from = Some(value("--from")?),
            "--to" => a.to = Some(value("--to")?),
            "--format" => a.format = Some(value("--format")?),
            "--output" | "-o" => a.output = Some(PathBuf::from(value("--output")?)),
            "--seconds" => {
                let v = value("--seconds")?;
                a.seconds = Some(v.parse().map_err(|_| format!("--seconds {v:?}: a whole number of seconds"))?)
            }
            "--version" | "-V" => {
                // Whether this build can run an anomaly model (one built
                // with --no-default-features cannot): operators and the
                // board tests ask.
                let runtime = if cfg!(feature = "tflite") {
                    "TF Lite runtime: on-device anomaly detection"
                } else {
                    "no TF Lite runtime: no on-device anomaly detection"
                };
                println!("edge-agent {} ({runtime})", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            s if !s.starts_with('-') => a.command.push(arg),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => return fail(2, &format!("{e}\n{USAGE}")),
    };
    edge_agent::init_logging("EDGE_AGENT_LOG");
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(2, &e.to_string()),
    };
    let cmd: Vec<&str> = args.command.iter().map(String::as_str).collect();
    match cmd.as_slice() {
        [] | ["run"] => match edge_agent::run(cfg, args.config.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                fail(1, &e.to_string())
            }
        },
        ["probes"] => {
            print!("{}", edge_agent::probe::report(&cfg));
            ExitCode::SUCCESS
        }
        ["check-config"] => {
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
        ["store", "inspect"] => {
            let dir = args.dir.unwrap_or_else(|| cfg.store_dir());
            match tools::inspect(&dir) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
        ["store", "export"] => match export(&args, &cfg) {
            Ok(n) => {
                let what = if args.format.as_deref() == Some("features") { "windows" } else { "samples" };
                eprintln!("edge-agent: exported {n} {what}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, &e),
        },
        ["model", "check", rest @ ..] if rest.len() <= 1 => {
            let card = rest.first().map_or_else(|| cfg.detect.model.clone(), PathBuf::from);
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
        ["tags", "discover"] => {
            let toml = match args.format.as_deref().unwrap_or("text") {
                "text" => false,
                "toml" => true,
                f => return fail(2, &format!("unknown --format {f:?}: use text or toml")),
            };
            let seconds = args.seconds.unwrap_or(30);
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
        _ => fail(2, &format!("unknown command {:?}\n{USAGE}", args.command.join(" "))),
    }
}

fn export(args: &Args, cfg: &Config) -> Result<u64, String> {
    let now = edge_agent::now_ms();
    let from = args.from.as_deref().map_or(Ok(i64::MIN), |t| tools::parse_time(t, now))?;
    let to = args.to.as_deref().map_or(Ok(i64::MAX), |t| tools::parse_time(t, now))?;
    let format = match args.format.as_deref().unwrap_or("openmetrics") {
        "openmetrics" => Format::OpenMetrics,
        "csv" => Format::Csv,
        "features" => Format::Features,
        f => return Err(format!("unknown --format {f:?}: use openmetrics, csv or features")),
    };
    let dir = args.dir.clone().unwrap_or_else(|| cfg.store_dir());
    let mut out: Box<dyn std::io::Write> = match &args.output {
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
