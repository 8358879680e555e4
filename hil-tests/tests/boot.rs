//! The cross-built agent on emulated boards: Debian's arm64 kernel (Debian
//! 12) booted by qemu-system-aarch64, and Debian's riscv64 kernel (Debian 13)
//! booted by qemu-system-riscv64, each with the Buildroot tree's rootfs
//! overlay (init script and default config, unchanged). The fleet side (mosquitto,
//! fleet-bridge, Prometheus) runs on the host in a private network
//! namespace, on the ports the default config names; the board reaches it
//! over virtio-net. The test checks that every probe attaches on the aarch64
//! kernel and measures what it sees, that the measurements reach Prometheus
//! with the device's timestamps, and that windows stored while the link was
//! cut arrive after it comes back. It prints boot-to-first-sample and the
//! agent's RSS (BENCHMARKS.md).

use e2e::{bridge, free_port, now_ms, tempdir, wait_for, Broker, Proc, Prom};
use hil_tests::{private_network, require_board_tools, Arch, Board, Image};
use std::sync::Mutex;
use std::time::Duration;

/// The overlay's config keeps the default window.
const WINDOW_MS: i64 = 10_000;
/// One emulated board at a time: two TCG guests on a 2-core CI machine
/// would starve each other (and the timing of their windows).
static ONE_BOARD: Mutex<()> = Mutex::new(());

#[test]
fn arm64_board_boots_attaches_and_delivers_across_a_link_cut() {
    boots_attaches_and_delivers_across_a_link_cut(Arch::Arm64);
}

#[test]
fn riscv64_board_boots_attaches_and_delivers_across_a_link_cut() {
    boots_attaches_and_delivers_across_a_link_cut(Arch::Riscv64);
}

fn boots_attaches_and_delivers_across_a_link_cut(arch: Arch) {
    if !require_board_tools(arch) {
        return;
    }
    let _one = ONE_BOARD.lock().unwrap_or_else(|e| e.into_inner());
    Image::fetch(arch);
    private_network();
    let device = format!("hil-{}-1", arch.debian());
    let dir = tempdir(&format!("hil-{}", arch.debian()));

    // The fleet side on the ports and name of the image's default config.
    let broker = Broker::start_as(&dir, "fleet-broker", [8883, 8884, 8885]);
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), "bridge-hil");

    // Provisioning: the device's identity, the fleet's CA, and where
    // "fleet-broker" is (QEMU's user network maps 10.0.2.2 to our loopback).
    let prov = dir.join("provision");
    std::fs::create_dir_all(prov.join("etc/edge-agent/tls")).unwrap();
    std::fs::write(prov.join("etc/hostname"), format!("{device}\n")).unwrap();
    std::fs::write(prov.join("etc/hosts"), "127.0.0.1\tlocalhost\n10.0.2.2\tfleet-broker\n").unwrap();
    let (crt, key) = broker.device_cert(&device);
    std::fs::copy(crt, prov.join("etc/edge-agent/tls/device.crt")).unwrap();
    std::fs::copy(key, prov.join("etc/edge-agent/tls/device.key")).unwrap();
    std::fs::copy(broker.pki.join("ca.crt"), prov.join("etc/edge-agent/tls/ca.crt")).unwrap();
    // Process values: the simulated pump PLC on the host; the board polls
    // its input registers once a second (BusyBox nc, one connection per
    // poll) and the agent, given two of the pump's tags, captures them.
    let plc_port = free_port();
    let _plc = Proc::spawn(
        "pump_sim",
        &dir,
        &e2e::bin_dir().join("pump_sim"),
        &["--port".into(), plc_port.to_string(), "--no-poll".into()],
        &[],
    );
    let overlay =
        std::fs::read_to_string(e2e::repo_dir().join("buildroot/board/edge/rootfs-overlay/etc/edge-agent/agent.toml"))
            .expect("the image's agent.toml");
    let tags = format!(
        "\n[probes.protocols]\nmodbus_ports = [{plc_port}]\n\n\
         [[tags]]\nname = \"vibration_rms\"\nunit = \"mm/s\"\nsource = \"modbus_tcp\"\nserver = \"10.0.2.2\"\n\
         port = {plc_port}\ntable = \"input\"\naddress = 0\nscale = 0.01\n\n\
         [[tags]]\nname = \"bearing_temperature\"\nunit = \"degC\"\nsource = \"modbus_tcp\"\nserver = \"10.0.2.2\"\n\
         port = {plc_port}\ntable = \"input\"\naddress = 4\ntype = \"f32\"\norder = \"CDAB\"\n"
    );
    std::fs::write(prov.join("etc/edge-agent/agent.toml"), format!("{overlay}{tags}")).unwrap();
    std::fs::create_dir_all(prov.join("etc/hil")).unwrap();
    // Read input registers 0..16 (function 4), transaction 1, unit 1.
    let poll = format!(
        "#!/bin/sh\nwhile :; do\n\tprintf '\\000\\001\\000\\000\\000\\006\\001\\004\\000\\000\\000\\020' \
         | nc -w 2 10.0.2.2 {plc_port} > /dev/null 2>&1\n\tsleep 1\ndone\n"
    );
    std::fs::write(prov.join("etc/hil/modbus.sh"), poll).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(prov.join("etc/hil/modbus.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let image = Image::build(arch, &dir, &prov);
    let mut board = Board::boot(&dir, &image);

    let init = board.wait_line("init at uptime", Duration::from_secs(180));
    eprintln!("board: init at uptime {init}");
    let machine = match arch {
        Arch::Arm64 => "aarch64",
        Arch::Riscv64 => "riscv64",
    };
    assert!(init.contains(machine), "not a {machine} kernel: {init}");
    board.wait_line("agent started", Duration::from_secs(60));

    // Every probe on the aarch64 kernel, as `edge-agent probes` reports it.
    board.wait_line("probes reported", Duration::from_secs(120));
    let probes = board.hil_lines("probes:");
    eprintln!("edge-agent probes on {}:\n  {}", image.kernel, probes.join("\n  "));
    // The device probe watches the serial ports sensors use; the default
    // globs include the arm64 board's console (ttyAMA*), not riscv64's
    // (ttyS*, which every PC has too): there it waits, hooking nothing.
    let device_io = match arch {
        Arch::Arm64 => "attached",
        Arch::Riscv64 => "waiting: no device matches",
    };
    for (probe, state) in [
        ("tcp_lifecycle", "attached"),
        ("tcp_retransmits", "attached"),
        ("tcp_resets_received", "attached"),
        ("tcp_resets_sent", "attached"),
        ("device_io", device_io),
        ("protocols", "attached"),
        ("tcp_idle", "attached"),
        // Both kernels have the bus subsystems (their tracepoints), boards
        // with buses or not.
        ("i2c", "attached"),
        ("smbus", "attached"),
        ("spi", "attached"),
        ("gpio", "attached"),
        ("regmap", "attached"),
    ] {
        let line = probes.iter().find(|l| l.split_whitespace().next() == Some(probe));
        assert!(
            line.is_some_and(|l| l.contains(state)),
            "probe {probe} not {state} on {}: {line:?}\nall:\n{}",
            image.kernel,
            probes.join("\n")
        );
    }

    // What the probes measured reaches Prometheus with the device label: the
    // agent's own MQTT connection (TCP probe, idle census, protocol probe's
    // byte counters) and syslogd writing to the serial console (device probe).
    let dev = format!("device=\"{device}\"");
    let mut checks = vec![
        format!("edge_tcp_connections_opened_total{{{dev},direction=\"outbound\",port_class=\"mqtt\"}}"),
        format!("edge_tcp_connections_established{{{dev},direction=\"outbound\",port_class=\"mqtt\"}}"),
        format!("edge_tcp_bytes_sent_total{{{dev},port_class=\"mqtt\"}}"),
    ];
    if arch == Arch::Arm64 {
        checks.push(format!("edge_device_bytes_total{{{dev},file=\"/dev/ttyAMA0\",op=\"write\",process=\"syslogd\"}}"));
    }
    // The shipped anomaly model: the agent (static on arm64, glibc on
    // riscv64; TF Lite in both) passes the model's golden self-test on the
    // board and scores every window (one built without TF Lite says so).
    let with_tflite = arch.agent_has_tflite();
    let model_line =
        if with_tflite { "anomaly model loaded and self-tested" } else { "built without the TF Lite runtime" };
    wait_for(&format!("{model_line:?} on the console"), Duration::from_secs(60), || {
        if board.console().contains(model_line) {
            Ok(())
        } else {
            Err(board.console_tail())
        }
    });
    if with_tflite {
        checks.push(format!("edge_anomaly_score{{{dev}}}"));
    }
    // The pump's values, captured from the board's polls by the protocol
    // probe on this kernel: positive readings in the pump's range.
    checks.push(format!("edge_process_value{{{dev},tag=\"vibration_rms\"}} > 1"));
    checks.push(format!("edge_process_value{{{dev},tag=\"bearing_temperature\"}} > 20"));
    for q in &checks {
        let v = wait_for(&format!("{q} in Prometheus"), Duration::from_secs(120), || {
            board.proc.assert_running();
            match prom.scalar(q) {
                Ok(Some(v)) if v > 0.0 => Ok(v),
                other => Err(format!("{other:?}\nconsole:\n{}", board.console_tail())),
            }
        });
        eprintln!("{q} = {v}");
    }

    if arch == Arch::Arm64 {
        buses_match_the_kernels_own_counts(&mut board, &prom, &dev);
    }

    let per_window = format!("edge_agent_store_bytes{{{dev},lane=\"routine\"}}");
    let first = prom.raw_samples(&per_window, 3600).unwrap();
    let first_ts = first.first().expect("a first window").0;
    let boot_to_first_sample_ms = first_ts - board.started_ms;

    // Cut the link: nothing more arrives; the board keeps measuring and
    // storing.
    let answer = board.monitor("set_link net0 off");
    assert!(!answer.contains("not found"), "set_link: {answer}");
    let cut_ms = now_ms();
    std::thread::sleep(Duration::from_millis(4 * WINDOW_MS as u64));
    let during = prom.raw_samples(&per_window, 3600).unwrap();
    let last_before_restore = during.last().map_or(0, |s| s.0);
    assert!(
        last_before_restore <= cut_ms + WINDOW_MS,
        "samples kept arriving with the link down: last at {last_before_restore}, cut at {cut_ms}"
    );
    board.monitor("set_link net0 on");
    let restored_ms = now_ms();

    // Every window of the cut arrives, with its own timestamp: no gap longer
    // than one window anywhere since the first sample.
    let samples = wait_for("the windows stored during the cut", Duration::from_secs(240), || {
        board.proc.assert_running();
        let s = prom.raw_samples(&per_window, 3600).map_err(|e| e.to_string())?;
        let covered = s.last().is_some_and(|last| last.0 >= restored_ms);
        let in_cut = s.iter().filter(|(t, _)| *t > cut_ms && *t < restored_ms).count();
        if covered && in_cut as i64 >= (restored_ms - cut_ms) / WINDOW_MS - 1 {
            Ok(s)
        } else {
            Err(format!("{} samples, {in_cut} in the cut", s.len()))
        }
    });
    let gaps: Vec<i64> = samples.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let widest = gaps.iter().copied().max().unwrap_or(0);
    assert!(
        widest <= WINDOW_MS * 3 / 2,
        "a window is missing: widest gap {widest} ms between samples {samples:?} (cut {cut_ms}..{restored_ms})"
    );
    let in_cut = samples.iter().filter(|(t, _)| *t > cut_ms && *t < restored_ms).count();
    let arrived_after_ms = now_ms() - restored_ms;

    let rss: Vec<(u64, u64)> = board
        .hil_lines("rss_kib")
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.parse().ok()?, f.get(2)?.parse().ok()?))
        })
        .collect();
    let (rss_kib, hwm_kib) = rss.last().copied().unwrap_or_default();
    let init_uptime: f64 = init.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    let table = format!(
        "| board | kernel | init at uptime | boot to first sample | windows in the {} s cut | all arrived after restore | agent RSS | agent peak RSS |\n\
         |---|---|---|---|---|---|---|---|\n\
         | {} | {} | {init_uptime:.1} s | {:.1} s | {in_cut} | {:.1} s | {:.1} MiB | {:.1} MiB |\n",
        (restored_ms - cut_ms) / 1000,
        match arch {
            Arch::Arm64 => "qemu-system-aarch64 virt, cortex-a72 x2, TCG",
            Arch::Riscv64 => "qemu-system-riscv64 virt, rv64 x2, TCG",
        },
        image.kernel,
        boot_to_first_sample_ms as f64 / 1000.0,
        arrived_after_ms as f64 / 1000.0,
        rss_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0,
    );
    println!("\n{table}");
    let _ = std::fs::create_dir_all(e2e::repo_dir().join("target/hil"));
    let _ = std::fs::write(e2e::repo_dir().join(format!("target/hil/boot_{}.md", arch.debian())), &table);
    assert!(rss_kib > 0, "no RSS reading from the board:\n{}", board.console_tail());
}

/// The arm64 board's sensor buses (i2c and SPI bit-banged on its GPIO
/// controller, hil-tests/image/arm64-buses.dtsi) exercised by
/// hil-tests/image/buses.sh while the agent runs: what reaches Prometheus
/// equals what the kernel's own tracer (ftrace) recorded of the same
/// tracepoints, operation for operation.
fn buses_match_the_kernels_own_counts(board: &mut Board, prom: &Prom, dev: &str) {
    // Six SIGHUP reloads before the exercise (the bus programs detached
    // and attached again): nothing leaked, the same process.
    let reload = board.wait_line("reload:", Duration::from_secs(240));
    eprintln!("reload cycles: {reload}");
    let r: std::collections::BTreeMap<&str, &str> =
        reload.split_whitespace().filter_map(|kv| kv.split_once('=')).collect();
    assert!(r.get("cycles") == Some(&"6") && r.get("pid") == r.get("now"), "{reload}");
    assert!(r.get("bpf_fds_before").is_some_and(|b| b.parse::<u32>().is_ok_and(|n| n >= 20)), "{reload}");
    assert_eq!(r.get("bpf_fds_before"), r.get("bpf_fds_after"), "BPF descriptors leaked across reloads: {reload}");
    let line = board.wait_line("buses:", Duration::from_secs(240));
    eprintln!("bus exercise, the kernel's counts: {line}");
    let truth: std::collections::BTreeMap<&str, f64> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let t = |k: &str| *truth.get(k).unwrap_or_else(|| panic!("no {k} in the exercise's line: {line}"));
    assert_eq!(t("lost"), 0.0, "ftrace lost events: no ground truth ({line})");
    // What the exercise did, at least (at24's probe retries its read for
    // 25 ms, so its transfers vary).
    assert!(t("i2c") >= 9.0 && t("i2c_enxio") == t("i2c"), "{line}");
    assert_eq!((t("smbus"), t("spi"), t("spi_bytes")), (5.0, 5.0, 28.0), "{line}");
    // A sysfs read of the value may read the line more than once.
    assert!(t("gpio_line7_get") >= 10.0, "{line}");
    assert!(t("regmap_read") >= 1.0 && t("gpio_value") > 10.0 && t("gpio_direction") >= 1.0, "{line}");
    let gpio7 = format!("chip=\"9030000.pl061\",{dev},line=\"7\",op=\"get\"");
    let checks = [
        (format!("sum(edge_i2c_transfer_seconds_count{{{dev}}})"), t("i2c")),
        (format!("sum(edge_i2c_errors_total{{{dev},errno=\"ENXIO\"}})"), t("i2c_enxio")),
        (format!("sum(edge_smbus_transfer_seconds_count{{{dev},addr=\"0x48\",op=\"read\"}})"), t("smbus")),
        (format!("sum(edge_smbus_errors_total{{{dev},errno=\"ENXIO\"}})"), t("smbus")),
        (format!("sum(edge_spi_message_seconds_count{{{dev}}})"), t("spi")),
        (format!("sum(edge_spi_bytes_total{{{dev}}})"), t("spi_bytes")),
        (format!("sum(edge_gpio_operations_total{{{dev}}})"), t("gpio_value")),
        (format!("sum(edge_gpio_operations_total{{{gpio7}}})"), t("gpio_line7_get")),
        (format!("sum(edge_gpio_direction_changes_total{{{dev}}})"), t("gpio_direction")),
        (format!("sum(edge_regmap_access_seconds_count{{{dev},regmap=\"0-0050\",op=\"read\"}})"), t("regmap_read")),
    ];
    for (q, want) in &checks {
        let got = wait_for(&format!("{q} = {want} in Prometheus"), Duration::from_secs(120), || {
            board.proc.assert_running();
            match prom.scalar(q) {
                Ok(Some(v)) if v == *want => Ok(v),
                other => Err(format!("{other:?}")),
            }
        });
        eprintln!("{q} = {got} (the kernel: {want})");
    }
    // Timed, not just counted: every i2c transfer and SPI message has a
    // latency (the bit-banged bus takes tens of microseconds at least).
    for h in ["edge_i2c_transfer_seconds", "edge_spi_message_seconds"] {
        let sum = prom.scalar(&format!("sum({h}_sum{{{dev}}})")).unwrap().unwrap_or(0.0);
        assert!(sum > 0.0, "{h}_sum is {sum}");
        eprintln!("{h}: mean {:.1} us", sum / t(if h.contains("i2c") { "i2c" } else { "spi" }) * 1e6);
    }
    program_costs(board, t("gpio_value"));
}

/// The bus programs' own run time on the board, from the kernel's BPF
/// statistics (the agent's /metrics, printed by init every 10 s), next to
/// the device probe's programs in the same run: emulated (TCG) time, so
/// the ratios mean more than the nanoseconds (BENCHMARKS.md).
fn program_costs(board: &mut Board, gpio_events: f64) {
    let last = |board: &Board| {
        let mut m = std::collections::BTreeMap::<String, f64>::new();
        for l in board.hil_lines("metric: ") {
            if let Some((k, v)) = l.rsplit_once(' ') {
                if let Ok(v) = v.parse() {
                    m.insert(k.to_owned(), v);
                }
            }
        }
        m
    };
    let runs = |p: &str| format!("edge_agent_probe_runs_total{{probe=\"{p}\"}}");
    let m = wait_for("the agent's program counts after the exercise", Duration::from_secs(60), || {
        board.proc.assert_running();
        let m = last(board);
        match m.get(&runs("gpio")) {
            Some(n) if *n >= gpio_events => Ok(m),
            other => Err(format!("{other:?}")),
        }
    });
    let mut table = String::from("| probe | program runs | run time | ns per run |\n|---|---|---|---|\n");
    for p in ["gpio", "i2c", "smbus", "spi", "regmap", "device_io", "tcp_lifecycle"] {
        let (Some(n), Some(s)) =
            (m.get(&runs(p)), m.get(&format!("edge_agent_probe_run_seconds_total{{probe=\"{p}\"}}")))
        else {
            continue;
        };
        let per = if *n > 0.0 { format!("{:.0}", s / n * 1e9) } else { "-".into() };
        table.push_str(&format!("| {p} | {n} | {:.3} ms | {per} |\n", s * 1e3));
    }
    println!("\nBPF program costs on the arm64 board (TCG):\n{table}");
    let _ = std::fs::write(e2e::repo_dir().join("target/hil/bus_costs_arm64.md"), &table);
}
