//! `edge-agent [--config FILE]`: see README.md and docs/configuration.md.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: edge-agent [run] [--config FILE]
       edge-agent check-config [--config FILE]
       edge-agent --version

Without --config the built-in defaults are used (docs/configuration.md).
Logging: EDGE_AGENT_LOG=debug (tracing EnvFilter syntax).";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    let mut command = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => return usage_error("--config needs a file name"),
            },
            "--version" | "-V" => {
                println!("edge-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "run" | "check-config" if command.is_none() => command = Some(a),
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    edge_agent::init_logging("EDGE_AGENT_LOG");
    let cfg = match edge_agent::config::Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if command.as_deref() == Some("check-config") {
        println!("configuration is valid (device_id = {})", cfg.device_id);
        return ExitCode::SUCCESS;
    }
    match edge_agent::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("edge-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("edge-agent: {msg}\n{USAGE}");
    ExitCode::from(2)
}
