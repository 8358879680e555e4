//! `fleet-bridge [--config FILE]`: see README.md and docs/configuration.md.

use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: fleet-bridge [--config FILE]
Logging: FLEET_BRIDGE_LOG=debug (tracing EnvFilter syntax).";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => return usage_error("--config needs a file name"),
            },
            "--version" | "-V" => {
                println!("fleet-bridge {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    fleet_bridge::init_logging();
    let cfg = match fleet_bridge::config::Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    match fleet_bridge::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-bridge: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("fleet-bridge: {msg}\n{USAGE}");
    ExitCode::from(2)
}
