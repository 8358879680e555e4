//! Attaching the probes on the real kernel: a tracepoint whose layout
//! cannot be read is reported with the reason while the others attach, and
//! repeated attach/detach cycles (TCP, device and protocol probes) leave no
//! program, map, link or mapping behind.

use edge_agent::config::{DevicesConfig, ProtocolsConfig, TcpLifecycleConfig};
use edge_agent::probe::device_io::{self, DeviceIoProbe};
use edge_agent::probe::protocols::ProtocolsProbe;
use edge_agent::probe::tcp_lifecycle::{TcpLifecycleProbe, TRACEPOINTS};
use edge_agent::probe::{tracefs, ProbeState};
use std::path::Path;

/// The tests attach and count kernel objects: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Attach/detach cycles of the leak test.
const CYCLES: usize = 20;

fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "probe tests need root (eBPF)");
    eprintln!("SKIPPED (not in CI): probe tests need root (eBPF)");
    false
}

/// A copy of the tracepoints' format files under `dir`, as a tracefs root.
fn fake_tracefs(real: &Path, dir: &Path) {
    for tp in TRACEPOINTS {
        let rel = Path::new("events").join(tp.group).join(tp.event);
        std::fs::create_dir_all(dir.join(&rel)).unwrap();
        std::fs::copy(real.join(&rel).join("format"), dir.join(&rel).join("format")).unwrap();
    }
}

#[test]
fn an_unreadable_tracepoint_is_reported_and_the_others_attach() {
    if !root_or_skip() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let real = tracefs::ensure_mounted().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fake_tracefs(&real, dir.path());
    // tcp_receive_reset without its sport field, as a kernel might lay it out.
    let f = dir.path().join("events/tcp/tcp_receive_reset/format");
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, text.lines().filter(|l| !l.contains(" sport;")).collect::<Vec<_>>().join("\n")).unwrap();
    // tcp_retransmit_synack missing altogether.
    std::fs::remove_dir_all(dir.path().join("events/tcp/tcp_retransmit_synack")).unwrap();

    let p = TcpLifecycleProbe::attach(dir.path(), &TcpLifecycleConfig::default()).unwrap();
    let state = |name: &str| p.states.iter().find(|(n, _)| *n == name).map(|(_, s)| s.clone()).unwrap();
    assert_eq!(state("tcp_lifecycle"), ProbeState::Attached);
    assert_eq!(state("tcp_retransmits"), ProbeState::Attached);
    assert_eq!(state("tcp_resets_sent"), ProbeState::Attached);
    match state("tcp_resets_received") {
        ProbeState::Unavailable(why) => assert!(why.contains("sport") && why.contains("tcp_receive_reset"), "{why}"),
        other => panic!("{other:?}"),
    }
    match state("tcp_synack_retransmits") {
        ProbeState::Unavailable(why) => assert!(why.contains("tcp_retransmit_synack"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The baseline's layout unreadable: the probe as a whole is unavailable.
    std::fs::remove_dir_all(dir.path().join("events/sock")).unwrap();
    let e = TcpLifecycleProbe::attach(dir.path(), &TcpLifecycleConfig::default()).err().unwrap();
    assert!(e.to_string().contains("inet_sock_set_state"), "{e}");
}

#[test]
fn attach_detach_cycles_leak_nothing() {
    if !root_or_skip() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let real = tracefs::ensure_mounted().unwrap();
    // This process's kernel objects: every BPF program, map and link and
    // every tracepoint perf event it holds is a file descriptor (nothing is
    // pinned), so when those are back to where they were, so is the kernel.
    let count = || {
        let mut n = std::collections::BTreeMap::<String, usize>::new();
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.display().to_string();
                if t.contains("bpf") || t.contains("perf_event") {
                    *n.entry(t).or_default() += 1;
                }
            }
        }
        n
    };
    // One cycle first: lazily created kernel objects are not leaks.
    // Every probe, RTT (off by default) included.
    // Peer groups too (their trie and counters are maps of their own).
    let mut all = TcpLifecycleConfig { rtt: true, ..Default::default() };
    all.peers.insert("lab".into(), vec!["10.0.0.0/8".into(), "fd00::/8".into()]);
    // The device probe with a device present: every syscall hook attached.
    let dev = DevicesConfig { watch: vec!["/dev/null".into()], ..Default::default() };
    drop(TcpLifecycleProbe::attach(&real, &all).unwrap());
    drop(DeviceIoProbe::load(&real, &dev).unwrap());
    let protocols = ProtocolsConfig::default();
    let classes = edge_agent::probe::tcp_lifecycle::PortClasses::from_config(&all);
    drop(ProtocolsProbe::attach(&protocols, Some(&classes), &Default::default()).unwrap());
    let before = count();
    let maps_before = mappings();
    // 20 cycles: a leak of one object per cycle shows as 20 descriptors or
    // mappings; each cycle costs about 2.5 s of the kernel's tracepoint
    // unregistration, so 100 took 250 s of CI for nothing more.
    for _ in 0..CYCLES {
        let p = TcpLifecycleProbe::attach(&real, &all).unwrap();
        assert!(p.states.iter().all(|(_, s)| *s == ProbeState::Attached), "{:?}", p.states);
        let d = DeviceIoProbe::load(&real, &dev).unwrap();
        assert_eq!(d.state, ProbeState::Attached);
        let i = ProtocolsProbe::attach(&protocols, Some(&classes), &Default::default()).unwrap();
        drop(p);
        drop(d);
        drop(i);
    }
    assert_eq!(mappings(), maps_before, "memory mappings (device filter, protocol cells) before and after");
    assert_eq!(count(), before, "BPF and perf-event descriptors before and after {CYCLES} cycles");
    // And while attached there are some: the count is not vacuous.
    let p = TcpLifecycleProbe::attach(&real, &all).unwrap();
    let held: usize = count().values().sum();
    assert!(held >= 10, "an attached probe holds {held} descriptors");
    drop(p);
}

/// How many memory mappings this process has.
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

#[test]
fn device_probe_layout_errors_name_the_call() {
    if !root_or_skip() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let real = tracefs::ensure_mounted().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for h in device_io::HOOKS {
        let rel = Path::new("events/syscalls").join(h.event);
        std::fs::create_dir_all(dir.path().join(&rel)).unwrap();
        std::fs::copy(real.join(&rel).join("format"), dir.path().join(&rel).join("format")).unwrap();
    }
    let dev = DevicesConfig { watch: vec!["/dev/null".into()], ..Default::default() };
    // An optional call missing (dup2, as on arm64): the probe attaches.
    std::fs::remove_dir_all(dir.path().join("events/syscalls/sys_enter_dup2")).unwrap();
    std::fs::remove_dir_all(dir.path().join("events/syscalls/sys_exit_dup2")).unwrap();
    assert_eq!(DeviceIoProbe::load(dir.path(), &dev).unwrap().state, ProbeState::Attached);
    // ioctl's fd somewhere else than the other calls': refused, named.
    let f = dir.path().join("events/syscalls/sys_enter_ioctl/format");
    let text = std::fs::read_to_string(&f).unwrap().replace("fd;\toffset:16;", "fd;\toffset:24;");
    std::fs::write(&f, text).unwrap();
    let e = DeviceIoProbe::load(dir.path(), &dev).err().unwrap().to_string();
    assert!(e.contains("sys_enter_ioctl") && e.contains("offset 24"), "{e}");
    // A required call missing: unavailable, naming it.
    std::fs::remove_dir_all(dir.path().join("events/syscalls/sys_exit_read")).unwrap();
    let e = DeviceIoProbe::load(dir.path(), &dev).err().unwrap().to_string();
    assert!(e.contains("sys_exit_read"), "{e}");
}

#[test]
fn the_probes_command_reports_every_probe() {
    if !root_or_skip() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("probes")
        .env("EDGE_AGENT_LOG", "error")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for tp in TRACEPOINTS {
        let line =
            text.lines().find(|l| l.starts_with(tp.probe)).unwrap_or_else(|| panic!("{} missing:\n{text}", tp.probe));
        let want = if tp.probe == "tcp_rtt" { "disabled (config)" } else { "attached" };
        assert!(line.contains(&format!("{}:{}", tp.group, tp.event)) && line.ends_with(want), "{line}");
    }
    // No watched device on a build machine (or one: then attached).
    let line =
        text.lines().find(|l| l.starts_with("device_io")).unwrap_or_else(|| panic!("device_io missing:\n{text}"));
    assert!(line.contains("waiting: no device matches /dev/ttyUSB*") || line.ends_with("attached"), "{line}");
    // No peer groups in the default config.
    let line =
        text.lines().find(|l| l.starts_with("tcp_peers")).unwrap_or_else(|| panic!("tcp_peers missing:\n{text}"));
    assert!(line.ends_with("disabled (config)"), "{line}");
    let line = text.lines().find(|l| l.starts_with("tcp_idle")).unwrap_or_else(|| panic!("tcp_idle missing:\n{text}"));
    assert!(line.contains("NETLINK_SOCK_DIAG") && line.ends_with("attached"), "{line}");
    let line =
        text.lines().find(|l| l.starts_with("protocols")).unwrap_or_else(|| panic!("protocols missing:\n{text}"));
    assert!(line.contains("cgroup_skb /") && line.ends_with("attached"), "{line}");
    assert!(text.starts_with("kernel "), "{text}");
}

/// The baseline a kernel without BTF (Jetson's 5.10) gets, forced on this
/// one: in a private mount namespace /sys/kernel/btf is an empty tmpfs, and
/// every probe still loads and attaches (scripts/test.sh also runs the
/// probe e2e tests so).
#[test]
fn every_probe_attaches_with_the_kernel_btf_hidden() {
    if !root_or_skip() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("agent.toml");
    std::fs::write(
        &conf,
        "[probes.devices]\nwatch = [\"/dev/null\"]\n[probes.tcp_lifecycle.peers]\nlab = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs none /sys/kernel/btf && test ! -e /sys/kernel/btf/vmlinux && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["probes", "--config"])
        .arg(&conf)
        .env("EDGE_AGENT_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().next().unwrap_or("").contains("BTF absent"), "{text}");
    let rows: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("probe ")).skip(1).collect();
    let buses = edge_agent::probe::buses::Kind::ALL;
    assert_eq!(rows.len(), TRACEPOINTS.len() + 4 + buses.len(), "{text}");
    let tracefs = tracefs::ensure_mounted().unwrap();
    for row in rows {
        let name = row.split_whitespace().next().unwrap_or("");
        // The bus families attach where the kernel has their tracepoints
        // (this machine's has none: no such hardware).
        let bus_missing = buses.iter().any(|k| k.probe() == name && !tracefs.join("events").join(name).is_dir());
        if bus_missing {
            assert!(row.contains("unavailable: tracepoint") && row.contains("does not exist on this kernel"), "{row}");
            continue;
        }
        let want = if name == "tcp_rtt" { "disabled (config)" } else { "attached" };
        assert!(row.ends_with(want), "{row}");
    }
}

/// The socket-diagnostics dump behind the idle-connection census sees both
/// ends of a loopback connection and the listener. Here rather than in the
/// unit tests: qemu-user (the cross-target test runs) has no NETLINK_SOCK_DIAG.
#[test]
fn the_socket_dump_sees_a_loopback_connection() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_s, _) = l.accept().unwrap();
    let (conns, listening) = edge_agent::probe::tcp_idle::dump().unwrap();
    assert!(listening.contains(&port));
    let local = c.local_addr().unwrap().port();
    assert!(conns.iter().any(|k| k.local_port == local && k.remote_port == port), "outbound end");
    assert!(conns.iter().any(|k| k.local_port == port && k.remote_port == local), "accepted end");
}
