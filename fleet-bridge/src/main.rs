//! `fleet-bridge [--config FILE]`: see README.md and docs/configuration.md.

use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: fleet-bridge [--config FILE]
       fleet-bridge audit verify FILE_OR_DIR...
Logging: FLEET_BRIDGE_LOG=debug (tracing EnvFilter syntax).";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("audit") {
        return audit(&all[1..]);
    }
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

/// `audit verify FILE_OR_DIR...`: every line checked against its frame,
/// every chain's links; a table by device. Exit 0: all intact; 1: damage
/// found (named); 2: not readable.
fn audit(args: &[String]) -> ExitCode {
    let [verb, paths @ ..] = args else { return usage_error("audit needs a verb: verify") };
    if verb != "verify" || paths.is_empty() {
        return usage_error("usage: fleet-bridge audit verify FILE_OR_DIR...");
    }
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    let report = match fleet_bridge::audit::verify(&paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-bridge audit verify: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{:<24} {:>8} {:>6} {:>8} {:>6} {:>6}", "device", "records", "chains", "missing", "breaks", "forks");
    for (device, d) in &report.devices {
        println!("{device:<24} {:>8} {:>6} {:>8} {:>6} {:>6}", d.records, d.chains, d.missing, d.breaks, d.forks);
    }
    for (file, line, why) in &report.bad_lines {
        println!("{}:{line}: {why}", file.display());
    }
    if report.clean() {
        println!("intact");
        ExitCode::SUCCESS
    } else {
        println!("DAMAGED: records missing, chains broken or lines edited (above)");
        ExitCode::FAILURE
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("fleet-bridge: {msg}\n{USAGE}");
    ExitCode::from(2)
}
