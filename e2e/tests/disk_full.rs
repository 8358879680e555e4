//! The agent on a full file system: its state directory is a tmpfs with a
//! few KiB left. It must keep running and storing windows by dropping its
//! oldest data, and say so in its metrics.

use e2e::*;
use std::ffi::CString;
use std::path::PathBuf;
use std::time::Duration;

struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let t = CString::new(self.0.to_str().unwrap_or_default()).unwrap_or_default();
        // SAFETY: valid C string.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn agent_keeps_running_on_a_full_disk_and_reports_drops() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("diskfull");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let target = CString::new(state.to_str().unwrap()).unwrap();
    // SAFETY: valid C strings.
    let rc =
        unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, c"size=1m".as_ptr().cast()) };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    let _unmount = Tmpfs(state.clone());
    // Fill it, leaving 64 KiB: a few of the agent's 16 KiB segments, then
    // the disk is full.
    std::fs::write(state.join("filler"), vec![0u8; (1 << 20) - (64 << 10)]).unwrap();

    let server = Server::start();
    let mut agent = Agent::start(
        &dir,
        &AgentSetup {
            device: "diskfull",
            broker: None, // no broker: everything stays in the store
            window_ms: 100,
            class_ports: &[server.port],
            state_dir: Some(&state),
            identity: None,
            mqtt: "",
            extra: "[store]\nsegment_bytes = 16384\nmax_bytes = 1048576\nfsync_interval_ms = 0\n",
            top: "",
            connection: None,
        },
    );
    server.connections(3);
    let dropped = "edge_agent_store_dropped_records_total{lane=\"routine\",reason=\"disk_full\"}";
    wait_for("disk_full drops", Duration::from_secs(60), || {
        agent.proc.assert_running();
        match agent.metric(dropped) {
            Some(v) if v > 0.0 => Ok(()),
            other => Err(other),
        }
    });
    // Still storing windows after the disk filled up.
    let appended = "edge_agent_store_appended_records_total{lane=\"routine\"}";
    let a0 = agent.metric(appended).unwrap_or(0.0);
    wait_for("windows stored after the disk filled", Duration::from_secs(30), || match agent.metric(appended) {
        Some(v) if v >= a0 + 10.0 => Ok(()),
        other => Err(other),
    });
    agent.proc.assert_running();
    assert!(agent.proc.log_text().contains("store dropped its oldest segment"), "no audit line in the log");
    let _ = std::fs::remove_dir_all(&dir);
}
