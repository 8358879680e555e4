//! `fleet-bridge [--config FILE]`: see README.md and docs/configuration.md.

use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: fleet-bridge [--config FILE]
       fleet-bridge audit verify FILE_OR_DIR...
       fleet-bridge config pack --target device:ID|group:NAME --id ID [--key ED25519.pem] FILE.toml OUT
       fleet-bridge rollout --config FILE --prometheus URL --group NAME --canary ID[,ID...] --id ID
                            [--watch-secs N] ([--key ED25519.pem] OVERLAY.toml | --model model.bundle | --programs PACK)
       fleet-bridge certificates sign --config FILE --ca-cert CA.crt --ca-key CA.key [--days N]
Logging: FLEET_BRIDGE_LOG=debug (tracing EnvFilter syntax).";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let all: Vec<String> = std::env::args().skip(1).collect();
    match all.first().map(String::as_str) {
        Some("audit") => return audit(&all[1..]),
        Some("config") => return config(&all[1..]),
        Some("rollout") => return rollout(&all[1..]),
        Some("certificates") => return certificates(&all[1..]),
        _ => {}
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

/// `config pack`: a remote configuration document (docs/remote-config.md)
/// from a TOML overlay, signed with `--key` if given, written to OUT; the
/// operator publishes it retained (mosquitto_pub -r -f OUT).
fn config(args: &[String]) -> ExitCode {
    const USE: &str =
        "usage: fleet-bridge config pack --target device:ID|group:NAME --id ID [--key ED25519.pem] FILE.toml OUT";
    let [verb, rest @ ..] = args else { return usage_error(USE) };
    if verb != "pack" {
        return usage_error(USE);
    }
    let (mut target, mut id, mut key, mut files) = (None, None, None, Vec::new());
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--target" => target = it.next().cloned(),
            "--id" => id = it.next().cloned(),
            "--key" => key = it.next().cloned(),
            _ => files.push(a.clone()),
        }
    }
    let (Some(target), Some(id), [file, out]) = (target, id, &files[..]) else { return usage_error(USE) };
    let fail = |msg: String| {
        eprintln!("fleet-bridge config pack: {msg}");
        ExitCode::from(2)
    };
    let toml = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(format!("{file}: {e}")),
    };
    if let Err(e) = toml.parse::<toml::Table>() {
        return fail(format!("{file}: not TOML: {e}"));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let doc = edge_wire::config_doc::ConfigDoc { target, id, issued_ms: now, toml };
    let payload = match key {
        None => doc.encode_unsigned(),
        Some(k) => {
            use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
            let der = match PrivatePkcs8KeyDer::from_pem_file(&k) {
                Ok(d) => d,
                Err(e) => {
                    return fail(format!(
                        "{k}: no PKCS#8 private key ({e:?}; make one: openssl genpkey -algorithm ed25519 -out {k})"
                    ))
                }
            };
            match doc.encode_signed(der.secret_pkcs8_der()) {
                Ok(p) => p,
                Err(e) => return fail(format!("{k}: {e}")),
            }
        }
    };
    if let Err(e) = edge_wire::config_doc::ConfigDoc::decode(&payload) {
        return fail(e.to_string());
    }
    match std::fs::write(out, &payload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{out}: {e}")),
    }
}

/// `rollout`: canaries first, watched in Prometheus, then the group or
/// back (fleet_bridge::rollout). Exit 0 promoted, 1 rolled back, 2 could
/// not run.
fn rollout(args: &[String]) -> ExitCode {
    let (opts, files) = options(args);
    let fail = |msg: String| {
        eprintln!("fleet-bridge rollout: {msg}");
        ExitCode::from(2)
    };
    let need = |k: &str| opts.get(k).filter(|v| !v.is_empty()).cloned();
    let (Some(config), Some(prometheus), Some(group), Some(canary), Some(id)) =
        (need("config"), need("prometheus"), need("group"), need("canary"), need("id"))
    else {
        return usage_error("rollout needs --config --prometheus --group --canary --id, and OVERLAY.toml or --model");
    };
    let cfg = match fleet_bridge::config::Config::load(Some(std::path::Path::new(&config))) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let change = match (need("model"), need("programs"), &files[..]) {
        (None, Some(pack), []) => match std::fs::read(&pack) {
            Ok(b) if b.starts_with(b"EDGE-PROBES-1\n") && b.len() <= edge_wire::MODEL_MESSAGE_MAX_BYTES => {
                fleet_bridge::rollout::Change::Programs(b)
            }
            Ok(_) => {
                return fail(format!(
                    "{pack}: not a probe program pack of at most 1 MiB (edge-agent programs pack makes one)"
                ))
            }
            Err(e) => return fail(format!("{pack}: {e}")),
        },
        (Some(bundle), None, []) => match std::fs::read(&bundle) {
            Ok(b) if b.starts_with(edge_wire::MODEL_MESSAGE_MAGIC) && b.len() <= edge_wire::MODEL_MESSAGE_MAX_BYTES => {
                fleet_bridge::rollout::Change::Model(b)
            }
            Ok(_) => {
                return fail(format!(
                    "{bundle}: not a model message of at most 1 MiB (model/run.sh sign makes model.bundle)"
                ))
            }
            Err(e) => return fail(format!("{bundle}: {e}")),
        },
        (None, None, [overlay]) => {
            let overlay_text = match std::fs::read_to_string(overlay) {
                Ok(t) if t.parse::<toml::Table>().is_ok() => t,
                Ok(_) => return fail(format!("{overlay}: not TOML")),
                Err(e) => return fail(format!("{overlay}: {e}")),
            };
            let key = match need("key") {
                None => None,
                Some(k) => {
                    use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
                    match PrivatePkcs8KeyDer::from_pem_file(&k) {
                        Ok(d) => Some(d.secret_pkcs8_der().to_vec()),
                        Err(e) => return fail(format!("{k}: no PKCS#8 private key ({e:?})")),
                    }
                }
            };
            fleet_bridge::rollout::Change::Config { overlay: overlay_text, key }
        }
        _ => return usage_error("rollout changes one thing: an OVERLAY.toml, --model model.bundle or --programs PACK"),
    };
    let watch = match need("watch-secs").map(|w| w.parse::<u64>()) {
        None => 300,
        Some(Ok(w)) if w >= 10 => w,
        _ => return fail("--watch-secs must be a number of seconds, at least 10".into()),
    };
    let plan = fleet_bridge::rollout::Plan {
        prometheus,
        group,
        canaries: canary.split(',').map(str::to_owned).collect(),
        id,
        change,
        watch: std::time::Duration::from_secs(watch),
    };
    if let Some(bad) = plan.canaries.iter().find(|c| edge_wire::validate_device_id(c).is_err()) {
        return fail(format!("--canary: {bad:?} is not a device id"));
    }
    match fleet_bridge::rollout::run(&cfg, &plan) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(e),
    }
}

/// `certificates sign`: the devices' retained certificate requests
/// answered with the device CA (fleet_bridge::certificates). Exit 0: none
/// refused; 1: some refused (printed); 2: could not run.
fn certificates(args: &[String]) -> ExitCode {
    const USE: &str = "usage: fleet-bridge certificates sign --config FILE --ca-cert CA.crt --ca-key CA.key [--days N]";
    let [verb, rest @ ..] = args else { return usage_error(USE) };
    let (opts, files) = options(rest);
    let need = |k: &str| opts.get(k).filter(|v| !v.is_empty()).cloned();
    let (true, Some(config), Some(ca_cert), Some(ca_key), []) =
        (verb == "sign", need("config"), need("ca-cert"), need("ca-key"), &files[..])
    else {
        return usage_error(USE);
    };
    let fail = |msg: String| {
        eprintln!("fleet-bridge certificates sign: {msg}");
        ExitCode::from(2)
    };
    let days = match need("days").map(|d| d.parse::<u32>()) {
        None => 365,
        Some(Ok(d)) if (1..=3650).contains(&d) => d,
        _ => return fail("--days must be 1 .. 3650".into()),
    };
    let cfg = match fleet_bridge::config::Config::load(Some(std::path::Path::new(&config))) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let authority = match fleet_bridge::certificates::Authority::load(ca_cert.as_ref(), ca_key.as_ref(), days) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    match fleet_bridge::certificates::run(&cfg, &authority) {
        Ok(s) => {
            println!("certificates: {} signed, {} already answered, {} refused", s.signed, s.answered, s.refused);
            if s.refused == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(e),
    }
}

/// `--key value` pairs and the other arguments.
fn options(args: &[String]) -> (std::collections::HashMap<String, String>, Vec<String>) {
    let mut opts = std::collections::HashMap::new();
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.strip_prefix("--") {
            Some(k) => {
                opts.insert(k.to_owned(), it.next().cloned().unwrap_or_default());
            }
            None => files.push(a.clone()),
        }
    }
    (opts, files)
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("fleet-bridge: {msg}\n{USAGE}");
    ExitCode::from(2)
}
