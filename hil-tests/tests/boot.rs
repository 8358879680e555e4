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

use e2e::{bridge, now_ms, tempdir, wait_for, Broker, Prom};
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
