//! The device-file probe against ground truth: a simulated serial sensor
//! (Modbus RTU over a pseudo-terminal, e2e/src/bin/rtu_sensor.rs) read by
//! another process that counts every system call it makes on the port
//! (rtu_reader.rs). The agent's operations, bytes, errors by errno and
//! latency histogram must equal what the reader did; a stalled reply must
//! show in the slow buckets. And the probe pays only for what it watches:
//! no syscall hook while no watched device exists, hooks as soon as one
//! appears, gone again when it vanishes.

use e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The simulated sensor; its pseudo-terminal's path.
fn sensor(dir: &Path, stall_request: u32, stall_ms: u32) -> (Proc, String) {
    let mut p = Proc::spawn(
        "rtu_sensor",
        dir,
        &bin_dir().join("rtu_sensor"),
        &[stall_request.to_string(), stall_ms.to_string()],
        &[],
    );
    let path = wait_for("the sensor's pty", Duration::from_secs(10), || {
        p.assert_running();
        p.log_text().lines().next().map(str::to_owned).filter(|l| l.starts_with("/dev/pts/")).ok_or("not yet")
    });
    (p, path)
}

/// Runs the reader on `tty` and returns what it counted.
fn read_sensor(tty: &str, polls: u32, slow_us: u64) -> serde_json::Value {
    let out = Command::new(bin_dir().join("rtu_reader"))
        .args([tty, &polls.to_string(), &slow_us.to_string()])
        .output()
        .expect("rtu_reader");
    assert!(out.status.success(), "rtu_reader: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("rtu_reader prints JSON")
}

fn agent(dir: &Path, watch: &str, tcp: bool) -> Agent {
    // The protocol probe's cgroup links would count as attachments too.
    // BPF run-time statistics go with the TCP probe here, to see the switch.
    let extra = format!(
        "[probes.tcp_lifecycle]\nenabled = {tcp}\n[probes.devices]\nwatch = [\"{watch}\"]\nrescan_secs = 1\n\
         [probes.protocols]\nenabled = false\n[probes]\nprogram_stats = {tcp}\n"
    );
    let setup = AgentSetup::offline("devices", &extra);
    let mut a = if tcp { Agent::start(dir, &setup) } else { Agent::launch(dir, &setup) };
    a.proc.assert_running();
    a
}

fn device_io_attached(a: &Agent) -> Option<f64> {
    a.metric("edge_agent_probe_attached{probe=\"device_io\"}")
}

/// The tracepoint attachments the agent holds: its BPF link descriptors
/// (perf event ones on kernels before 5.15), one per attached tracepoint.
/// The TCP and protocol probes are off in the test that counts them, so
/// these are the syscall hooks.
fn perf_events(pid: i32) -> usize {
    kernel_objects(pid, &["bpf_link", "perf_event"])
}

#[test]
fn serial_sensor_ops_bytes_errors_and_stall_match_the_reader() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("devices-serial");
    // The 3rd reply comes 400 ms late: one read between 2^18 and 2^19 us.
    let (_sensor, tty) = sensor(&dir, 3, 400);
    let a = agent(&dir, &tty, true);
    wait_for("the device hooks to attach", Duration::from_secs(20), || {
        (device_io_attached(&a) == Some(1.0)).then_some(()).ok_or("not attached")
    });
    // A first window stored before the reader starts: the feature export
    // below differences windows, so the first one gives no row.
    wait_for("a first stored window", Duration::from_secs(20), || {
        stored(&dir, "edge_agent_store_bytes", &["lane=\"routine\""]).ok_or("none yet")
    });
    // Counted exactly, like the kernel's fence: > 2^18 us.
    let truth = read_sensor(&tty, 20, 262_144);
    assert_eq!(kernel_objects(a.proc.pid(), &["bpf-stats"]), 1, "the agent keeps BPF statistics on");
    let n = |k: &str| truth[k].as_u64().unwrap() as f64;
    assert_eq!(n("slow_reads"), 1.0, "the stall did not happen: {truth}");
    assert_eq!(n("exceptions"), 1.0, "{truth}");

    let labels =
        |op: &'static str| [format!("file=\"{tty}\""), format!("op=\"{op}\""), "process=\"rtu_reader\"".to_string()];
    let get = |metric: &str, op: &'static str, extra: &[&str]| {
        let l = labels(op);
        let mut all: Vec<&str> = l.iter().map(String::as_str).collect();
        all.extend_from_slice(extra);
        stored(&dir, metric, &all)
    };
    let count = |op| get("edge_device_operation_seconds_count", op, &[]);
    // The reader has exited; wait for a window that has all of it.
    wait_for("the reader's operations in a stored window", Duration::from_secs(20), || {
        (count("read") == Some(n("reads")) && count("open") == Some(1.0)).then_some(()).ok_or(format!(
            "read {:?} open {:?}, reader did {truth}",
            count("read"),
            count("open")
        ))
    });
    e2e::settled(&dir, 2);
    assert_eq!(count("open"), Some(n("opens")));
    assert_eq!(count("ioctl"), Some(n("ioctls")));
    assert_eq!(count("read"), Some(n("reads")));
    assert_eq!(count("write"), Some(n("writes")));
    assert_eq!(get("edge_device_bytes_total", "read", &[]), Some(n("read_bytes")));
    assert_eq!(get("edge_device_bytes_total", "write", &[]), Some(n("write_bytes")));
    assert_eq!(get("edge_device_errors_total", "read", &["errno=\"EAGAIN\""]), Some(n("eagain")));
    // No other errors: the writes and ioctls all succeeded.
    assert_eq!(get("edge_device_errors_total", "write", &[]), None);
    assert_eq!(get("edge_device_errors_total", "ioctl", &[]), None);
    // The stalled read: above the 0.262144 s bound, within 0.524288 s.
    let bucket = |le: &str| {
        let le = format!("le=\"{le}\"");
        get("edge_device_operation_seconds_bucket", "read", &[&le])
    };
    assert_eq!(bucket("+Inf").unwrap() - bucket("0.262144").unwrap(), 1.0, "one slow read");
    assert_eq!(bucket("0.524288"), bucket("+Inf"));
    let sum = get("edge_device_operation_seconds_sum", "read", &[]).unwrap();
    assert!((0.39..2.0).contains(&sum), "read latency sum {sum} s holds the 400 ms stall");
    // The sensor's own descriptor of the line was found by the /proc scan
    // (it opened it before the agent started); it did no I/O on it.
    assert!(a.metric("edge_agent_device_files_found_total{how=\"scan\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(stored(&dir, "edge_device_operation_seconds_count", &["process=\"rtu_sensor\""]), None);

    // The anomaly model's training data (`--format features`): per window,
    // rates times the window's length add up to what the reader did, and
    // the stall is in some window's p99.
    let all_ops = n("opens") + n("ioctls") + n("reads") + n("writes");
    let rows = export_features(&dir);
    let col = |name: &str| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r["window_s"], r.get(&format!("{name}{{{tty}}}")).copied().unwrap_or(0.0))).collect()
    };
    let ops: f64 = col("dev_ops_per_s").iter().map(|(w, v)| w * v).sum();
    assert!((ops - all_ops).abs() < 1e-6, "features say {ops} operations, the reader did {all_ops}");
    let bytes: f64 = col("dev_bytes_per_s").iter().map(|(w, v)| w * v).sum();
    assert!((bytes - n("read_bytes") - n("write_bytes")).abs() < 1e-6, "features say {bytes} bytes");
    let p99 = col("dev_latency_p99_s").iter().map(|(_, v)| *v).fold(0.0, f64::max);
    assert!((0.262144..=0.524288).contains(&p99), "the 400 ms stall in a window's p99: {p99}");
    let errors: f64 = col("dev_error_ratio").iter().zip(col("dev_ops_per_s")).map(|((w, r), (_, o))| r * o * w).sum();
    assert!((errors - n("eagain")).abs() < 1e-6, "features say {errors} errors, the reader had {}", n("eagain"));
}

#[test]
fn hooks_attach_only_while_a_watched_device_exists() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("devices-appear");
    let (_sensor, tty) = sensor(&dir, 0, 0);
    // Watched by a name that does not exist yet (as a USB adapter not
    // plugged in): the probe waits, with no syscall hook attached.
    let link = dir.join("ttyFIELD0");
    let a = agent(&dir, &format!("{}/ttyFIELD*", dir.display()), false);
    wait_for("the device probe to report waiting", Duration::from_secs(20), || {
        (device_io_attached(&a) == Some(0.0)).then_some(()).ok_or("no state")
    });
    assert_eq!(perf_events(a.proc.pid()), 0, "no tracepoint attached while nothing is watched");
    assert_eq!(kernel_objects(a.proc.pid(), &["bpf-stats"]), 0, "probes.program_stats = false: no statistics held");
    assert_eq!(a.metric("edge_agent_devices_watched"), Some(0.0));

    // The device appears: hooks within a window, and the reader's open by
    // the new name is seen by the open hook.
    std::os::unix::fs::symlink(&tty, &link).unwrap();
    wait_for("the device hooks to attach", Duration::from_secs(20), || {
        (device_io_attached(&a) == Some(1.0)).then_some(()).ok_or("not attached")
    });
    // read, pread64, readv, write, pwrite64, writev, ioctl, openat, dup3,
    // dup2 (where it exists) in and out, and close.
    let hooks = perf_events(a.proc.pid());
    assert!((19..=21).contains(&hooks), "{hooks} syscall hooks");
    let truth = read_sensor(&link.display().to_string(), 3, 10_000_000);
    let file = format!("file=\"{}\"", link.display());
    wait_for("the reads through the new name", Duration::from_secs(20), || {
        let got = stored(&dir, "edge_device_operation_seconds_count", &[&file, "op=\"read\""]);
        (got == truth["reads"].as_f64()).then_some(()).ok_or(format!("{got:?} vs {truth}"))
    });

    // It vanishes: hooks detached again.
    std::fs::remove_file(&link).unwrap();
    wait_for("the device hooks to detach", Duration::from_secs(20), || {
        (device_io_attached(&a) == Some(0.0) && perf_events(a.proc.pid()) == 0).then_some(()).ok_or("still attached")
    });
}

/// A named pipe: a watched "device" whose reads block until the test writes.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.display().to_string()).unwrap();
    // SAFETY: a valid path; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// An agent watching a FIFO in a new test directory, its hooks attached:
/// (directory, FIFO, agent).
fn watched_fifo(name: &str) -> (std::path::PathBuf, std::path::PathBuf, Agent) {
    let dir = tempdir(name);
    let fifo = dir.join("fifo0");
    mkfifo(&fifo);
    let a = agent(&dir, &fifo.display().to_string(), false);
    wait_for("the device hooks to attach", Duration::from_secs(20), || {
        (device_io_attached(&a) == Some(1.0)).then_some(()).ok_or("not attached")
    });
    (dir, fifo, a)
}

/// Two threads whose ids share an in-flight slot (tid mod 1,024), both
/// blocked in a read of a watched file at once: the second times its read in
/// the overflow hash, and both reads count, exactly.
#[test]
fn threads_sharing_an_inflight_slot_are_both_counted() {
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    if !require_root_and_tools() {
        return;
    }
    let (dir, fifo, a) = watched_fifo("devices-slots");
    // Read and write ends in one (a FIFO opened read-write does not block).
    let f = Arc::new(std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap());
    let tid = || unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    let reader = |f: Arc<std::fs::File>| {
        move || {
            let mut b = [0u8; 1];
            let started = std::time::Instant::now();
            // SAFETY: reads into a 1-byte buffer from an open descriptor.
            let n = unsafe { libc::read(f.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            (n, started.elapsed().as_secs_f64())
        }
    };
    let first = {
        let (tx, rx) = std::sync::mpsc::channel();
        let read = reader(f.clone());
        let h = std::thread::spawn(move || {
            tx.send(tid()).unwrap();
            read()
        });
        (h, rx.recv().unwrap())
    };
    // New threads until one has an id 1,024 apart (ids are handed out in
    // order; other processes may take some).
    let second = loop {
        let (tx, rx) = std::sync::mpsc::channel();
        let read = reader(f.clone());
        let want = first.1 % 1024;
        let h = std::thread::spawn(move || {
            let me = tid();
            tx.send(me).unwrap();
            (me % 1024 == want).then(read)
        });
        let me = rx.recv().unwrap();
        if me % 1024 == want {
            break (h, me);
        }
        h.join().unwrap();
        assert!(me < first.1 + 100_000, "no thread id sharing slot {want}");
    };
    assert_ne!(first.1, second.1);
    // Both inside read(2) (blocked on the empty FIFO).
    e2e::in_syscall(first.1, libc::SYS_read);
    e2e::in_syscall(second.1, libc::SYS_read);
    // SAFETY: writes 2 bytes from a valid buffer.
    assert_eq!(unsafe { libc::write(f.as_raw_fd(), b"xy".as_ptr().cast(), 2) }, 2);
    let (n1, took1) = first.0.join().unwrap();
    let (n2, took2) = second.0.join().unwrap().unwrap();
    assert_eq!((n1, n2), (1, 1));

    let file = format!("file=\"{}\"", fifo.display());
    let count = |op: &str| stored(&dir, "edge_device_operation_seconds_count", &[&file, &format!("op=\"{op}\"")]);
    wait_for("both reads counted", Duration::from_secs(20), || {
        (count("read") == Some(2.0) && count("write") == Some(1.0)).then_some(()).ok_or(format!(
            "read {:?} write {:?}",
            count("read"),
            count("write")
        ))
    });
    assert_eq!(a.metric("edge_agent_device_inflight_spilled_total"), Some(1.0), "the second read went to the hash");
    assert_eq!(a.metric("edge_agent_device_inflight_stale_total"), Some(0.0));
    // Both waited for the write: the latency sum holds both reads' times
    // (as the threads measured them around the call, a little longer).
    let sum = stored(&dir, "edge_device_operation_seconds_sum", &[&file, "op=\"read\""]).unwrap();
    let measured = took1 + took2;
    assert!(sum <= measured + 0.001 && sum >= 0.8 * measured - 0.02, "read latency sum {sum} s, measured {measured} s");
}

/// A read blocked while the hooks detach (the watched file vanished) and
/// attach again (a new file by that name) ends unseen: the agent freed its
/// in-flight record at the detach, so the thread's next exit counts nothing
/// that did not happen while watched.
#[test]
fn an_operation_in_flight_across_a_detach_is_not_counted() {
    use std::os::fd::AsRawFd;
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("devices-detach");
    let fifo = dir.join("fifo0");
    mkfifo(&fifo);
    let a = agent(&dir, &fifo.display().to_string(), false);
    let attached = |want: f64| {
        wait_for("the device hooks to follow the file", Duration::from_secs(20), || {
            (device_io_attached(&a) == Some(want)).then_some(()).ok_or("not yet")
        })
    };
    attached(1.0);
    let f = std::sync::Arc::new(std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap());
    let g = f.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let blocked = std::thread::spawn(move || {
        tx.send(unsafe { libc::syscall(libc::SYS_gettid) } as u32).unwrap();
        let mut b = [0u8; 1];
        // SAFETY: reads into a 1-byte buffer from an open descriptor; then
        // a second read, of a byte already there.
        let first = unsafe { libc::read(g.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        let second = unsafe { libc::read(g.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        (first, second)
    });
    // Inside the first read(2) (blocked on the empty FIFO).
    e2e::in_syscall(rx.recv().unwrap(), libc::SYS_read);
    std::fs::remove_file(&fifo).unwrap();
    attached(0.0);
    mkfifo(&fifo);
    attached(1.0);
    // SAFETY: writes 2 bytes from a valid buffer: both reads return.
    assert_eq!(unsafe { libc::write(f.as_raw_fd(), b"xy".as_ptr().cast(), 2) }, 2);
    assert_eq!(blocked.join().unwrap(), (1, 1));
    // Two windows for anything to show.
    e2e::settled(&dir, 2);
    let file = format!("file=\"{}\"", fifo.display());
    // The open (while watched) counted. Of the reads, only the second: the
    // /proc scan at the attach found the old file's descriptor (a removed
    // device node still counts), so it was watched from its start; it
    // returned at once. The first began before the detach: not counted,
    // neither at its own exit nor at the second read's.
    // (By process: the test thread's name at the open, the process's from
    // the scan; summed over both.)
    let all = |metric: &str, op: &str| stored_sum(&dir, metric, &[&file, &format!("op=\"{op}\"")]);
    assert_eq!(all("edge_device_operation_seconds_count", "open"), 1.0);
    assert_eq!(all("edge_device_operation_seconds_count", "read"), 1.0);
    let sum = all("edge_device_operation_seconds_sum", "read");
    assert!(sum < 0.1, "the counted read is the quick one: {sum} s");
    assert_eq!(a.metric("edge_agent_device_inflight_stale_total"), Some(0.0));
}

/// More (device, process name) pairs than the kernel numbers (64): the
/// first 64 threads' operations count under their own names, those of the
/// rest are counted as not counted (`map_full{map="series"}`), exactly.
#[test]
fn pairs_past_the_series_cap_are_counted_as_dropped() {
    use std::io::{Read, Write};
    if !require_root_and_tools() {
        return;
    }
    const CAP: usize = 64;
    const EXTRA: usize = 6;
    let (dir, fifo, a) = watched_fifo("devices-series");
    // One thread after another, each its own name (the kernel's comm):
    // open, write a byte, read it back, close.
    for i in 0..CAP + EXTRA {
        let fifo = fifo.clone();
        std::thread::Builder::new()
            .name(format!("pair{i:02}"))
            .spawn(move || {
                let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
                f.write_all(b"x").unwrap();
                let mut b = [0u8; 1];
                f.read_exact(&mut b).unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }
    let file = format!("file=\"{}\"", fifo.display());
    let full = || a.metric("edge_agent_device_map_full_total{map=\"series\"}");
    wait_for("the dropped operations counted", Duration::from_secs(20), || {
        (full() == Some((EXTRA * 3) as f64)).then_some(()).ok_or(format!("{:?}", full()))
    });
    for op in ["open", "write", "read"] {
        let op = format!("op=\"{op}\"");
        wait_for(&format!("{op} of the first {CAP} pairs stored"), Duration::from_secs(20), || {
            match stored_sum(&dir, "edge_device_operation_seconds_count", &[&file, &op]) {
                n if n == CAP as f64 => Ok(()),
                n => Err(n),
            }
        });
    }
    for (i, want) in [(0, Some(1.0)), (CAP - 1, Some(1.0)), (CAP, None)] {
        let process = format!("process=\"pair{i:02}\"");
        assert_eq!(
            stored(&dir, "edge_device_operation_seconds_count", &[&file, "op=\"read\"", &process]),
            want,
            "{process}"
        );
    }
}
