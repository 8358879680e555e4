//! The TCP probes against ground truth the test makes: retransmits under
//! packet loss injected by nftables on a veth pair between two private
//! network namespaces, the duration of a connection held idle, and idle
//! connections counted until they talk.

use e2e::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A private network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// Runs `f` on a thread that has entered this namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on a valid namespace fd; affects this thread only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            f()
        })
    }

    /// One counter of the namespace's /proc/net/snmp or /proc/net/netstat
    /// (`file`), in the section starting `prefix` ("Tcp:", "TcpExt:").
    fn net_counter(&self, file: &str, prefix: &str, name: &str) -> u64 {
        let out = Command::new("ip").args(["netns", "exec", &self.0, "cat", file]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
        let names: Vec<&str> = rows[0].split_whitespace().collect();
        let values: Vec<&str> = rows[1].split_whitespace().collect();
        let i = names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("{name} not in {file}"));
        values[i].parse().unwrap()
    }

    /// Retransmitted segments the namespace sent: RetransSegs, less the
    /// attempts whose local transmit failed (TCPRetransFail), which the
    /// kernel counts in RetransSegs but the tracepoint reports with an
    /// error (the probe counts successful sends only).
    fn retrans_segs(&self) -> u64 {
        self.net_counter("/proc/net/snmp", "Tcp:", "RetransSegs")
            - self.net_counter("/proc/net/netstat", "TcpExt:", "TCPRetransFail")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The agent with every TCP probe on (RTT included) and `port` watched.
fn agent(dir: &std::path::Path, port: u16) -> Agent {
    let ports = [port];
    let setup =
        AgentSetup { class_ports: &ports, ..AgentSetup::offline("probes", "[probes.tcp_lifecycle]\nrtt = true\n") };
    Agent::start(dir, &setup)
}

fn metric(a: &Agent, name: &str, direction: &str) -> f64 {
    a.metric(&format!("{name}{{direction=\"{direction}\",port_class=\"e2e\"}}")).unwrap_or(0.0)
}

#[test]
fn retransmits_under_injected_packet_loss_are_counted() {
    if !require_root_and_tools() {
        return;
    }
    let tag = std::process::id() % 100_000;
    let (a, b) = (Netns::new(format!("edge-a-{tag}")), Netns::new(format!("edge-b-{tag}")));
    let (va, vb) = (format!("eva{tag}"), format!("evb{tag}"));
    run(&["ip", "link", "add", &va, "netns", &a.0, "type", "veth", "peer", "name", &vb, "netns", &b.0]);
    run(&["ip", "-n", &a.0, "addr", "add", "10.231.0.1/24", "dev", &va]);
    run(&["ip", "-n", &b.0, "addr", "add", "10.231.0.2/24", "dev", &vb]);
    // One segment per packet (no GSO), so that the kernel's segment count
    // and the tracepoint's packet count are the same thing.
    run(&["ip", "-n", &a.0, "link", "set", &va, "gso_max_segs", "1", "up"]);
    run(&["ip", "-n", &b.0, "link", "set", &vb, "gso_max_segs", "1", "up"]);
    let port = 15020u16;
    // 10 % of the packets of this connection dropped, both ways.
    for (ns, dir) in [(&b.0, "dport"), (&a.0, "sport")] {
        let nft = |args: &[&str]| run(&[&["ip", "netns", "exec", ns, "nft"], args].concat());
        nft(&["add", "table", "inet", "edge_loss"]);
        nft(&["add", "chain", "inet", "edge_loss", "input", "{ type filter hook input priority 0; policy accept; }"]);
        let p = port.to_string();
        nft(&[
            "add",
            "rule",
            "inet",
            "edge_loss",
            "input",
            "tcp",
            dir,
            &p,
            "numgen",
            "random",
            "mod",
            "100",
            "<",
            "10",
            "drop",
        ]);
    }
    let dir = tempdir("retrans");
    let agent = agent(&dir, port);
    let before = a.retrans_segs() + b.retrans_segs();

    let (listening, up) = std::sync::mpsc::channel();
    let server = b.spawn(move || {
        let l = std::net::TcpListener::bind(("10.231.0.2", port)).expect("bind in netns");
        listening.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        c.write_all(&buf[..256 * 1024]).unwrap();
        buf.len()
    });
    up.recv_timeout(Duration::from_secs(10)).expect("the listener is up");
    let client = a.spawn(move || {
        let mut c = std::net::TcpStream::connect(("10.231.0.2", port)).expect("connect across the veth");
        c.write_all(&vec![7u8; 1 << 20]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        back.len()
    });
    assert_eq!(client.join().unwrap(), 256 * 1024);
    assert_eq!(server.join().unwrap(), 1 << 20);
    // Both ends closed (a lost FIN is retransmitted after the applications
    // are done): from then on nothing more is sent in these namespaces.
    wait_for("both ends closed", Duration::from_secs(30), || {
        let closed = (
            metric(&agent, "edge_tcp_connections_closed_total", "outbound"),
            metric(&agent, "edge_tcp_connections_closed_total", "inbound"),
        );
        if closed == (1.0, 1.0) {
            Ok(())
        } else {
            Err(closed)
        }
    });
    let kernel = (a.retrans_segs() + b.retrans_segs() - before) as f64;
    assert!(kernel > 0.0, "no retransmits under 10 % loss?");
    // One segment per packet here: the agent's count is the kernel's own
    // (RetransSegs of both namespaces; only this connection runs there),
    // less the events the kernel did not give the programs: a retransmit
    // from a timer's softirq that interrupts any BPF tracing program on that
    // CPU is skipped (recursion_misses). The agent says how many; 0 is the
    // usual case, and then the counts are equal. (The misses may also be
    // retransmits elsewhere on the machine: an upper bound.)
    let agent_count = || {
        // A retransmission after an end reached CLOSE (its last ACK lost)
        // finds no socket entry: labelled by port, direction "unknown".
        metric(&agent, "edge_tcp_retransmits_total", "outbound")
            + metric(&agent, "edge_tcp_retransmits_total", "inbound")
            + metric(&agent, "edge_tcp_retransmits_total", "unknown")
    };
    let missed = || {
        ["tcp_retransmits", "tcp_synack_retransmits"]
            .iter()
            .map(|p| agent.metric(&format!("edge_agent_probe_missed_runs_total{{probe=\"{p}\"}}")))
            .sum::<Option<f64>>()
            .expect("the kernel reports missed runs (5.12+)")
    };
    wait_for("the agent's count to reach the kernel's", Duration::from_secs(10), || {
        let (n, m) = (agent_count(), missed());
        if n + m >= kernel {
            Ok(())
        } else {
            Err(format!("agent {n} (+{m} missed), kernel {kernel}"))
        }
    });
    // Two windows more: nothing was still on its way.
    e2e::settled(&dir, 2);
    let (counted, m) = (agent_count(), missed());
    eprintln!("retransmits: agent {counted}, kernel {kernel} segments, {m} missed by the programs");
    assert!(counted <= kernel && kernel <= counted + m, "agent {counted} (+{m} missed), kernel {kernel}");
    assert_eq!(metric(&agent, "edge_tcp_connections_opened_total", "outbound"), 1.0);
    assert_eq!(metric(&agent, "edge_tcp_connections_opened_total", "inbound"), 1.0);
    // RTT and cwnd seen on the received segments of the watched port (from
    // tcp:tcp_probe), in the windows.
    let both = |m: &str, d: &str| stored(&dir, m, &[&format!("direction=\"{d}\""), "port_class=\"e2e\""]);
    wait_for("RTT histograms stored", Duration::from_secs(10), || {
        match (both("edge_tcp_rtt_seconds_count", "outbound"), both("edge_tcp_rtt_seconds_count", "inbound")) {
            (Some(a), Some(b)) if a > 0.0 && b > 0.0 => Ok(()),
            other => Err(other),
        }
    });
    let (n, sum) = (
        both("edge_tcp_rtt_seconds_count", "outbound").unwrap(),
        both("edge_tcp_rtt_seconds_sum", "outbound").unwrap(),
    );
    assert!(sum / n > 0.0 && sum / n < 1.0, "mean smoothed RTT on a veth: {} s", sum / n);
    let cwnd = both("edge_tcp_cwnd_segments_count", "outbound").unwrap();
    assert_eq!(cwnd, n, "one cwnd observation per RTT observation");
}

#[test]
fn an_idle_connection_closed_later_lands_in_its_duration_bucket() {
    if !require_root_and_tools() {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dir = tempdir("duration");
    let agent = agent(&dir, port);
    let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (s, _) = l.accept().unwrap();
    // Held idle 1.2 s: the 1.024 s .. 2.048 s bucket.
    std::thread::sleep(Duration::from_millis(1200));
    drop(c);
    drop(s);
    wait_for("the connection's close", Duration::from_secs(10), || {
        match metric(&agent, "edge_tcp_connections_closed_total", "outbound") {
            n if n >= 1.0 => Ok(()),
            n => Err(n),
        }
    });
    // Histograms travel in the windows (not on /metrics): read the store.
    let bucket = "edge_tcp_connection_duration_seconds_bucket";
    let last = |le: &str| {
        let le = format!("le=\"{le}\"");
        stored(&dir, bucket, &["direction=\"outbound\"", "port_class=\"e2e\"", &le]).unwrap_or(-1.0)
    };
    // /metrics moves at the window's close, the store a moment later.
    wait_for("the window with the close stored", Duration::from_secs(10), || match last("2.048") {
        1.0 => Ok(()),
        v => Err(v),
    });
    assert_eq!(last("1.024"), 0.0, "not below 1.024 s");
}

#[test]
fn a_socket_the_application_does_not_close_shows_in_close_wait() {
    if !require_root_and_tools() {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dir = tempdir("closewait");
    let agent = agent(&dir, port);
    let gauge = || agent.metric("edge_tcp_connections_close_wait{direction=\"inbound\",port_class=\"e2e\"}");
    let clients: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let servers: Vec<_> = (0..3).map(|_| l.accept().unwrap().0).collect();
    // The peers close; our "application" (the test) keeps its three sockets.
    drop(clients);
    wait_for("three connections in CLOSE_WAIT", Duration::from_secs(10), || match gauge() {
        Some(3.0) => Ok(()),
        other => Err(other),
    });
    drop(servers);
    wait_for("none once closed", Duration::from_secs(10), || match gauge() {
        Some(0.0) => Ok(()),
        other => Err(other),
    });
}

/// The process's BPF objects and tracepoint perf events, by descriptor.
fn bpf_fds(pid: i32) -> usize {
    kernel_objects(pid, &["bpf", "perf_event"])
}

/// A reload sent while the agent is still starting (the store opened, the
/// probes loading) is not fatal: the handler is installed before anything
/// else, so the default action (exit) never applies. CI once sent the
/// test's SIGHUP in the window where /metrics answered and the handler did
/// not yet exist.
#[test]
fn a_sighup_during_the_start_does_not_kill_the_agent() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("early-hup");
    let mut a = Agent::launch(&dir, &AgentSetup::offline("early-hup", ""));
    wait_for("the agent to open its store", Duration::from_secs(10), || {
        a.proc.assert_running();
        if a.proc.log_text().contains("store opened") {
            Ok(())
        } else {
            Err("not yet")
        }
    });
    a.proc.signal(libc::SIGHUP);
    wait_for("the probes attached after an early SIGHUP", Duration::from_secs(30), || {
        a.proc.assert_running();
        a.metric("edge_agent_probe_attached{probe=\"tcp_lifecycle\"}").filter(|v| *v == 1.0).ok_or("not attached")
    });
    a.proc.stop();
}

#[test]
fn sighup_reconfigures_the_probes_without_a_restart() {
    if !require_root_and_tools() {
        return;
    }
    let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (p1, p2) = (first.local_addr().unwrap().port(), second.local_addr().unwrap().port());
    let dir = tempdir("sighup");
    let mut agent = agent(&dir, p1);
    let pid = agent.proc.pid();
    let conf = agent.config_path().to_owned();
    let original = std::fs::read_to_string(&conf).unwrap();
    let attached = |a: &Agent| a.metric("edge_agent_probe_attached{probe=\"tcp_lifecycle\"}");
    let held = bpf_fds(pid);
    assert!(held >= 10, "the attached probes hold {held} descriptors");

    let protocols = |a: &Agent| a.metric("edge_agent_probe_attached{probe=\"protocols\"}");
    assert_eq!(protocols(&agent), Some(1.0));

    // Disabled (the device probe, loaded and waiting for a device, and the
    // protocol probe's cgroup programs too): every program, map and link is
    // let go, the process lives on.
    let off = original.replace("[probes.tcp_lifecycle]\n", "[probes.tcp_lifecycle]\nenabled = false\n");
    std::fs::write(
        &conf,
        format!(
            "{off}\n[probes.devices]\nenabled = false\n[probes.protocols]\nenabled = false\n\
             [probes.buses]\nenabled = false\n"
        ),
    )
    .unwrap();
    agent.proc.signal(libc::SIGHUP);
    wait_for("the probes detached and freed", Duration::from_secs(10), || {
        agent.proc.assert_running();
        match (attached(&agent), protocols(&agent), bpf_fds(pid)) {
            (Some(0.0), Some(0.0), 0) => Ok(()),
            other => Err(other),
        }
    });

    // Enabled again, watching another port: counts under the new filter.
    std::fs::write(&conf, original.replace(&format!("e2e = [{p1}]"), &format!("e2e = [{p2}]"))).unwrap();
    agent.proc.signal(libc::SIGHUP);
    wait_for("the probes attached again", Duration::from_secs(10), || match (attached(&agent), protocols(&agent)) {
        (Some(1.0), Some(1.0)) => Ok(()),
        other => Err(other),
    });
    let before = metric(&agent, "edge_tcp_connections_opened_total", "outbound");
    for l in [&second, &second, &first] {
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        drop((c, s));
    }
    wait_for("two connections to the newly watched port", Duration::from_secs(10), || {
        match metric(&agent, "edge_tcp_connections_opened_total", "outbound") - before {
            2.0 => Ok(()),
            n => Err(n),
        }
    });

    // A broken file changes nothing and stops nothing.
    std::fs::write(&conf, "this is not toml [").unwrap();
    agent.proc.signal(libc::SIGHUP);
    wait_for("the refusal logged", Duration::from_secs(10), || {
        agent.proc.assert_running();
        if agent.proc.log_text().contains("config not reloaded") {
            Ok(())
        } else {
            Err(())
        }
    });
    assert_eq!(attached(&agent), Some(1.0));
    assert!(bpf_fds(pid) >= 10);
}

#[test]
fn idle_connections_are_counted_until_they_talk() {
    if !require_root_and_tools() {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dir = tempdir("idle");
    let ports = [port];
    let _a = Agent::start(
        &dir,
        &AgentSetup {
            class_ports: &ports,
            extra: "[probes.tcp_lifecycle]\nidle_secs = 1\n",
            top: "",
            ..AgentSetup::offline("idle", "")
        },
    );
    let mut conns: Vec<_> = (0..2)
        .map(|_| {
            let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            (c, l.accept().unwrap().0)
        })
        .collect();
    let get = |metric: &str, direction: &str| {
        stored(&dir, metric, &[&format!("direction=\"{direction}\""), "port_class=\"e2e\""])
    };
    let both = |metric: &str| (get(metric, "outbound"), get(metric, "inbound"));
    // Quiet for over a second: both connections idle, at both ends.
    wait_for("two idle connections at both ends", Duration::from_secs(20), || {
        (both("edge_tcp_connections_idle") == (Some(2.0), Some(2.0)))
            .then_some(())
            .ok_or(both("edge_tcp_connections_idle"))
    });
    assert_eq!(both("edge_tcp_connections_established"), (Some(2.0), Some(2.0)));
    // One talks (a byte each way every 100 ms): one idle left, at both ends.
    wait_for("one idle connection at both ends", Duration::from_secs(20), || {
        conns[0].0.write_all(b"x").unwrap();
        conns[0].1.write_all(b"y").unwrap();
        (both("edge_tcp_connections_idle") == (Some(1.0), Some(1.0)))
            .then_some(())
            .ok_or(both("edge_tcp_connections_idle"))
    });
    assert_eq!(both("edge_tcp_connections_established"), (Some(2.0), Some(2.0)));
    // Closed: the gauges go to 0 (sent, not dropped).
    conns.clear();
    wait_for("no connection left", Duration::from_secs(20), || {
        let now = (both("edge_tcp_connections_established"), both("edge_tcp_connections_idle"));
        (now == ((Some(0.0), Some(0.0)), (Some(0.0), Some(0.0)))).then_some(()).ok_or(now)
    });
}

/// Peer groups: connections counted by the group of their remote address
/// (IPv4, IPv4 reached from an IPv6 socket, native IPv6), refusals included,
/// with no address in any label.
#[test]
fn connections_are_counted_per_peer_group() {
    if !require_root_and_tools() {
        return;
    }
    // Addresses no other test of this file uses (all of 127/8 is loopback).
    let plc = std::net::TcpListener::bind("127.0.0.77:0").unwrap();
    let mapped = std::net::TcpListener::bind("127.0.0.78:0").unwrap();
    let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.77:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempdir("peers");
    let extra =
        "[probes.tcp_lifecycle.peers]\nplc = [\"127.0.0.77\"]\nmapped = [\"127.0.0.78/32\"]\nv6 = [\"::1/128\"]\n";
    let a = Agent::start(dir.as_path(), &AgentSetup::offline("peers", extra));
    assert_eq!(a.metric("edge_agent_probe_attached{probe=\"tcp_peers\"}"), Some(1.0));

    let connect = |l: &std::net::TcpListener, to: std::net::SocketAddr, n: usize| {
        for _ in 0..n {
            let c = std::net::TcpStream::connect(to).unwrap();
            let (s, _) = l.accept().unwrap();
            drop((c, s));
        }
    };
    connect(&plc, plc.local_addr().unwrap(), 3);
    let port = mapped.local_addr().unwrap().port();
    connect(&mapped, format!("[::ffff:127.0.0.78]:{port}").parse().unwrap(), 2);
    connect(&v6, v6.local_addr().unwrap(), 4);
    for _ in 0..2 {
        assert!(std::net::TcpStream::connect(("127.0.0.77", closed)).is_err());
    }

    let peer = |name: &str, direction: &str, group: &str| {
        a.metric(&format!("edge_tcp_peer_connections_{name}_total{{direction=\"{direction}\",peer=\"{group}\"}}"))
            .unwrap_or(0.0)
    };
    wait_for("per-peer counts", Duration::from_secs(10), || {
        let got = [
            peer("opened", "outbound", "plc"),
            peer("opened", "outbound", "mapped"),
            peer("opened", "outbound", "v6"),
            peer("failed", "outbound", "plc"),
            peer("refused", "outbound", "plc"),
            // ::1 talks to ::1: the accepted side's peer is in the group too.
            peer("opened", "inbound", "v6"),
            peer("closed", "outbound", "plc"),
        ];
        if got == [3.0, 2.0, 4.0, 2.0, 2.0, 4.0, 3.0] {
            Ok(())
        } else {
            Err(got)
        }
    });
    // Stored with the same labels, and the connect latency per group.
    wait_for("the peer series stored", Duration::from_secs(10), || {
        let opened =
            stored(&dir, "edge_tcp_peer_connections_opened_total", &["peer=\"plc\"", "direction=\"outbound\""]);
        let latency = stored(&dir, "edge_tcp_peer_connect_latency_seconds_count", &["peer=\"v6\""]);
        if opened == Some(3.0) && latency == Some(4.0) {
            Ok(())
        } else {
            Err((opened, latency))
        }
    });
    // No address anywhere in what is stored.
    let out = Command::new(bin_dir().join("edge-agent"))
        .args(["store", "export", "--dir", &dir.join("agent-state/store").display().to_string(), "--format", "csv"])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(!csv.contains("127.0.0.") && !csv.contains("::1"), "an address left the probe");
}

/// The bus probes (i2c, SMBus, SPI, GPIO, regmap) attach where the kernel
/// has their tracepoints and say exactly which one is missing elsewhere
/// (this machine's kernel has no i2c, spi, gpio or regmap events: no such
/// hardware). Their counts against real buses: the arm64 board
/// (hil-tests/tests/boot.rs).
#[test]
fn bus_probes_attach_where_their_tracepoints_exist_and_say_why_not_elsewhere() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("buses");
    let mut a = Agent::start(&dir, &AgentSetup::offline("buses", ""));
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| p.join("events").is_dir())
        .expect("the agent mounted tracefs");
    let out = Command::new(bin_dir().join("edge-agent"))
        .args(["probes", "--config", &a.config_path().display().to_string()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "edge-agent probes: {report}{}", String::from_utf8_lossy(&out.stderr));
    for (probe, group, first_event) in [
        ("i2c", "i2c", "i2c_write"),
        ("smbus", "smbus", "smbus_write"),
        ("spi", "spi", "spi_message_start"),
        ("gpio", "gpio", "gpio_value"),
        ("regmap", "regmap", "regmap_hw_read_start"),
    ] {
        let present = tracefs.join("events").join(group).is_dir();
        let q = format!("edge_agent_probe_attached{{probe=\"{probe}\"}}");
        let v = wait_for(&q, Duration::from_secs(10), || a.metric(&q).ok_or("not exported"));
        assert_eq!(v, if present { 1.0 } else { 0.0 }, "{q} with tracepoint group {group} present: {present}");
        let line =
            report.lines().find(|l| l.split_whitespace().next() == Some(probe)).unwrap_or_else(|| panic!("{report}"));
        if present {
            assert!(line.contains("attached"), "{line}");
        } else {
            let why =
                format!("unavailable: tracepoint {group}:{first_event} does not exist on this kernel (needs CONFIG_");
            assert!(line.contains(&why), "{line}\nexpected: {why}");
        }
    }
    a.proc.assert_running();
    a.proc.stop();
}
