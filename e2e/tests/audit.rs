//! The audit trail end to end (docs/audit.md): the agent's records reach
//! the bridge's log through the real broker; records written while the box
//! was offline and then tampered with in its store — one edited with a
//! valid record CRC (as someone who knows the format would), one deleted —
//! are found by the bridge as it takes them (a break, a gap) and again by
//! `fleet-bridge audit verify` over its log, which also names a line
//! edited in the log itself, and on the box by `edge-agent store audit`.

use e2e::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn wait_logged(dir: &Path, device: &str, agent: &mut Agent, what: &str, done: impl Fn(&[(String, String)]) -> bool) {
    wait_for(what, Duration::from_secs(60), || {
        agent.proc.assert_running();
        let e = audit_events(dir, device);
        if done(&e) {
            Ok(())
        } else {
            Err(e)
        }
    });
}

fn stored_records(agent: &Agent) -> f64 {
    agent.metric("edge_agent_audit_records_total{result=\"stored\"}").unwrap_or(0.0)
}

/// Rewrites the `nth` record (from 0) of the priority lane whose payload
/// holds `find`: `replace` in its place (same length), with a CRC that
/// fits (`fix_crc`) or not (the record then reads back corrupt: gone).
fn tamper(priority: &Path, nth: usize, find: &[u8], replace: &[u8], fix_crc: bool) {
    let mut seen = 0;
    const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(priority)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect();
    segs.sort();
    for seg in segs {
        let mut bytes = std::fs::read(&seg).unwrap();
        let mut at = 16; // the segment header
        while at + 28 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            let payload = at + 28..at + 28 + len;
            let found = bytes[payload.clone()].windows(find.len()).position(|w| w == find);
            if found.is_some() && seen < nth {
                seen += 1;
            } else if let Some(i) = found {
                let p = payload.start + i;
                bytes[p..p + replace.len()].copy_from_slice(replace);
                if fix_crc {
                    let mut d = CRC32C.digest();
                    d.update(&bytes[at..at + 24]);
                    d.update(&bytes[payload.clone()]);
                    bytes[at + 24..at + 28].copy_from_slice(&d.finalize().to_le_bytes());
                }
                std::fs::write(&seg, &bytes).unwrap();
                return;
            }
            at = payload.end;
        }
    }
    panic!("no record holding {:?} in {}", String::from_utf8_lossy(find), priority.display());
}

fn verify(paths: &[&Path]) -> (i32, String) {
    let out = std::process::Command::new(bin_dir().join("fleet-bridge"))
        .arg("audit")
        .arg("verify")
        .args(paths)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn records_edited_or_deleted_on_the_box_are_found_by_the_bridge_and_by_verify() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("audit");
    let log = dir.join("audit");
    let device = format!("e2e-audit-{}", std::process::id());
    let mut broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (mut bridge_proc, bridge_port) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    let mut agent = Agent::launch(&dir, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(&device, QUIET) });
    let has = |e: &[(String, String)], event: &str| e.iter().any(|(x, _)| x == event);
    wait_logged(&log, &device, &mut agent, "the start's records in the bridge's log", |e| {
        has(e, "agent_started") && has(e, "config_applied") && has(e, "probes_changed")
    });
    let first = audit_events(&log, &device);
    assert_eq!(first[0], ("agent_started".to_owned(), "first".to_owned()), "{first:?}");
    assert!(first[1..].iter().all(|(_, link)| link == "next"), "{first:?}");

    // A reload while online: in the log, linked.
    let conf = agent.config_path().to_owned();
    let change = |n: u32| {
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!("# change {n}\n"));
        std::fs::write(&conf, text).unwrap();
    };
    change(1);
    agent.proc.signal(libc::SIGHUP);
    wait_logged(&log, &device, &mut agent, "the reload's record", |e| {
        e.iter().any(|(x, l)| x == "config_applied" && l == "next" && e.len() > first.len())
    });

    // Offline: two reloads and a stop, recorded on the box only.
    broker.stop();
    for n in [2, 3] {
        let before = stored_records(&agent);
        change(n);
        agent.proc.signal(libc::SIGHUP);
        wait_for("the reload recorded on the box", Duration::from_secs(20), || {
            agent.proc.assert_running();
            if stored_records(&agent) > before {
                Ok(())
            } else {
                Err(before)
            }
        });
    }
    agent.proc.stop();
    // The first offline reload's record edited (its source "sighup" made
    // "remote"; the online reload's record is the first with "sighup"),
    // its record CRC fixed; the stop's record deleted (made unreadable).
    let priority = dir.join("agent-state/store/priority");
    tamper(&priority, 1, b"source\x06sighup", b"source\x06remote", true);
    tamper(&priority, 0, b"agent_stopped", b"agent_st0pped", false);
    broker.restart();
    agent.relaunch();
    wait_logged(&log, &device, &mut agent, "the offline records and the new start in the log", |e| {
        e.iter().filter(|(x, _)| x == "agent_started").count() == 2
    });
    let all = audit_events(&log, &device);
    // The start's config_applied, then the online reload's.
    let online_reload = all.iter().enumerate().filter(|(_, (x, _))| x == "config_applied").nth(1).unwrap().0;
    assert_eq!(
        all[online_reload + 1..online_reload + 4],
        [
            ("config_applied".to_owned(), "next".to_owned()), // edited: links to what came before
            ("config_applied".to_owned(), "break".to_owned()), // its successor no longer does
            ("agent_started".to_owned(), "gap".to_owned()),   // agent_stopped never came
        ],
        "{all:?}"
    );
    let lines: Vec<serde_json::Value> =
        audit_log(&log).into_iter().filter(|l| l["device"] == device.as_str()).collect();
    assert_eq!(lines[online_reload + 1]["fields"]["source"], "remote");
    for (reason, n) in [("break", 1.0), ("gap", 1.0), ("fork", 0.0)] {
        let q = format!("fleet_bridge_audit_problems_total{{device=\"{device}\",reason=\"{reason}\"}}");
        assert_eq!(scrape(bridge_port, &q).unwrap().unwrap_or(0.0), n, "{q}");
    }

    // On the box: the records it holds, and where they stop linking.
    let out = std::process::Command::new(bin_dir().join("edge-agent"))
        .args(["-c", &conf.display().to_string(), "store", "audit"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("link=break config_applied").count(), 1, "{text}");
    assert_eq!(text.matches("link=gap agent_started").count(), 1, "{text}");
    assert!(text.contains("2 records do not link"), "{text}");

    // verify: the same damage from the log alone, and a line edited in it.
    // The agent and the bridge stopped first: the box keeps recording (a
    // probe that attaches late, a clock era, its stop) and the log must
    // not grow between counting its lines and verifying it.
    agent.proc.stop();
    bridge_proc.stop();
    let records = audit_log(&log).into_iter().filter(|l| l["device"] == device.as_str()).count().to_string();
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 1, "{out}");
    let row: Vec<&str> = out.lines().find(|l| l.starts_with(&device)).unwrap().split_whitespace().collect();
    assert_eq!(row[1..], [records.as_str(), "1", "1", "1", "0"], "records chains missing breaks forks:\n{out}");
    let file = std::fs::read_dir(&log).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("\"agent_started\"", "\"agent_startet\"", 1)).unwrap();
    let (code, out) = verify(&[&log]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":1: the line does not say what its frame says"), "{out}");
}
