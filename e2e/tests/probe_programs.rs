//! Probe program packs (edge-agent/src/probe_programs.rs) through a canary
//! rollout, with the real broker, bridge and Prometheus and the probes on
//! this kernel: a pack of the programs (made by `edge-agent programs
//! export` and `pack`, signed) is tried on the canary, promoted to the
//! group and installed by the other box from the group's topic; a pack
//! whose TCP program does not load is put back by the canary itself (its
//! probes attach again with the programs before), and the rollout rolls it
//! back; the other box never sees it.

use e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const GROUP: &str = "line-2";

fn run(args: &[&str]) {
    let o = Command::new(bin_dir().join("edge-agent")).args(args).output().unwrap();
    assert!(o.status.success(), "edge-agent {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn programs(a: &Agent, result: &str) -> f64 {
    a.metric(&format!("edge_agent_probe_programs_total{{result=\"{result}\"}}")).unwrap_or(0.0)
}

fn tcp_attached(a: &Agent) -> f64 {
    a.metric("edge_agent_probe_attached{probe=\"tcp_lifecycle\"}").unwrap_or(0.0)
}

fn agent(dir: &Path, broker: &Broker, device: &str, public: &Path) -> Agent {
    std::fs::create_dir_all(dir).unwrap();
    let extra = format!(
        "[probes.devices]\nenabled = false\n[probes.protocols]\nenabled = false\n[probes.buses]\nenabled = false\n\
         [detect]\nenabled = false\n[remote_config]\ngroups = [\"{GROUP}\"]\n\
         [probe_programs]\npublic_key_file = \"{}\"\n",
        public.display()
    );
    Agent::start(dir, &AgentSetup { broker: Some(broker), ..AgentSetup::offline(device, &extra) })
}

#[test]
fn a_program_pack_is_promoted_from_a_canary_and_one_that_does_not_load_is_put_back() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("probe-programs");
    let (key, public) = ed25519_key_pair(&dir, "programs");
    let objects = dir.join("objects");
    run(&["programs", "export", &objects.display().to_string()]);
    let good = dir.join("good.pack");
    let pack = |version: &str, out: &Path, objects: &Path| {
        let (key, out, objects) = (key.display().to_string(), out.display().to_string(), objects.display().to_string());
        run(&["programs", "pack", "--key", &key, "--version", version, "--out", &out, &objects]);
    };
    pack("2", &good, &objects);
    // The TCP program cut short: signed, and matching its card, but not an
    // object the kernel takes.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let tcp = std::fs::read(objects.join("tcp_lifecycle.bpf.o")).unwrap();
    std::fs::write(broken.join("tcp_lifecycle.bpf.o"), &tcp[..tcp.len() / 3]).unwrap();
    let bad = dir.join("bad.pack");
    pack("3-broken", &bad, &broken);

    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let pid = std::process::id();
    let (canary, other) = (format!("e2e-pcanary-{pid}"), format!("e2e-pother-{pid}"));
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{canary}"));
    let mut a = agent(&dir.join("a"), &broker, &canary, &public);
    let mut b = agent(&dir.join("b"), &broker, &other, &public);
    for d in [&canary, &other] {
        let q = format!("sum(last_over_time(edge_agent_probe_programs_total{{device=\"{d}\"}}[5m]))");
        wait_for("the boxes' program counts in Prometheus", Duration::from_secs(30), || match prom.scalar(&q) {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }
    assert_eq!((tcp_attached(&a), tcp_attached(&b)), (1.0, 1.0));
    let conf = operator_config(&dir, &broker);
    let rollout = |id: &str, pack: &Path| {
        e2e::rollout(&conf, &prom, GROUP, &canary, id, &["--programs".as_ref(), pack.as_os_str()])
    };

    // 1. Loads and attaches: promoted; the other box takes it from the
    //    group's topic.
    let (code, out) = rollout("programs-2", &good);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("watched device:{canary}: healthy")), "{out}");
    wait_for("the other box on the promoted pack", Duration::from_secs(40), || {
        b.proc.assert_running();
        (programs(&b, "installed") == 1.0).then_some(()).ok_or(programs(&b, "installed"))
    });
    assert_eq!(tcp_attached(&b), 1.0);
    assert_eq!(programs(&a, "installed"), 1.0, "the group's copy of the pack the canary runs is not tried again");
    assert!(dir.join("b/agent-state/probe-programs/current/pack").exists());

    // 2. Does not load: the canary puts the programs before back itself;
    //    the rollout rolls back.
    let (code, out) = rollout("programs-3", &bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("unhealthy: the box reverted it"), "{out}");
    wait_for("the canary's probe attached again", Duration::from_secs(40), || {
        a.proc.assert_running();
        (tcp_attached(&a) == 1.0).then_some(()).ok_or(tcp_attached(&a))
    });
    assert_eq!((programs(&a, "installed"), programs(&a, "rolled_back")), (1.0, 1.0));
    assert_eq!(
        std::fs::read(dir.join("a/agent-state/probe-programs/current/pack")).unwrap(),
        std::fs::read(&good).unwrap(),
        "the promoted pack is in force again"
    );
    assert_eq!((programs(&b, "installed"), programs(&b, "rolled_back")), (1.0, 0.0), "the other box never saw it");
    // The audit records travel on their own lane: the rollback's may
    // reach the bridge's log after the counters the rollout watched.
    wait_for("the canary's program steps in the bridge's audit log", Duration::from_secs(30), || {
        let audit = audit_events(&dir.join("audit"), &canary);
        let steps: Vec<String> =
            audit.iter().map(|(e, _)| e.clone()).filter(|e| e.starts_with("probe_programs_")).collect();
        (steps == ["probe_programs_installed", "probe_programs_rolled_back"]).then_some(()).ok_or(audit)
    });
}
