//! Where the probes' `EbpfLoader`s are made: without the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new()` reads and parses the kernel's whole BTF
//! (`/sys/kernel/btf/vmlinux`, 5-6 MB: about 20 MB of heap at its peak)
//! before its caller can say it needs none; none of our objects has CO-RE
//! relocations (each probe sets `btf(None)`), so the parse is only the
//! agent's peak memory. aya 0.15+ parses lazily but needs a newer Rust than
//! this project's. Until then the loaders are made on one thread of the
//! agent's own that lives in a mount namespace of its own, where
//! `/sys/kernel/btf` is an empty tmpfs: `Btf::from_sys_fs()` finds no file
//! and the loader has no BTF, as `btf(None)` would leave it. Only that
//! thread sees the tmpfs (its namespace is private: nothing propagates to
//! the rest of the agent or the box); the programs load on the caller's
//! thread as before.
//!
//! The thread starts with the first probe that loads (as root, before the
//! privilege drop: making a namespace needs CAP_SYS_ADMIN) and stays, idle,
//! to serve the loaders of later loads (a bus module appearing, a reload)
//! after the drop. Where the namespace cannot be made (no CAP_SYS_ADMIN,
//! no mount namespaces) or the kernel has no BTF, the plain constructor is
//! used: the same loader, with the parse.

use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::OnceLock;

use aya::EbpfLoader;

const KERNEL_BTF_DIR: &std::ffi::CStr = c"/sys/kernel/btf";

type Request = SyncSender<EbpfLoader<'static>>;

/// The thread that makes loaders, when it could hide the kernel's BTF.
static MAKER: OnceLock<Option<Sender<Request>>> = OnceLock::new();

/// A loader that has not parsed the kernel's BTF where that can be avoided.
pub fn new() -> EbpfLoader<'static> {
    if let Some(maker) = MAKER.get_or_init(start) {
        let (tx, rx) = sync_channel(1);
        if maker.send(tx).is_ok() {
            if let Ok(loader) = rx.recv() {
                return loader;
            }
        }
    }
    EbpfLoader::new()
}

/// Whether loaders are made without the kernel's BTF (false: no BTF to
/// hide, or the namespace could not be made). Starts the thread.
pub fn hides_kernel_btf() -> bool {
    MAKER.get_or_init(start).is_some()
}

fn start() -> Option<Sender<Request>> {
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return None; // no BTF: the plain constructor parses nothing
    }
    let (ready_tx, ready_rx) = sync_channel::<Result<(), String>>(1);
    let (tx, rx) = channel::<Request>();
    let spawned = std::thread::Builder::new().name("ebpf-loaders".into()).stack_size(256 * 1024).spawn(move || {
        let hidden = hide_kernel_btf();
        let ok = hidden.is_ok();
        let _ = ready_tx.send(hidden);
        if ok {
            for reply in rx {
                let _ = reply.send(EbpfLoader::new());
            }
        }
    });
    if let Err(e) = spawned {
        tracing::debug!("probe loaders: no thread of their own ({e}); the kernel's BTF is parsed per load");
        return None;
    }
    match ready_rx.recv() {
        Ok(Ok(())) => Some(tx),
        Ok(Err(e)) => {
            tracing::debug!("probe loaders: cannot hide the kernel's BTF ({e}); it is parsed per load");
            None
        }
        Err(_) => None,
    }
}

/// On the calling thread only: a mount namespace of its own, private (no
/// mount events leave it), with an empty read-only tmpfs on
/// /sys/kernel/btf.
fn hide_kernel_btf() -> Result<(), String> {
    let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain syscalls with valid C strings; each result is checked.
    // CLONE_NEWNS implies CLONE_FS, which a thread may unshare on its own:
    // the new namespace is this thread's alone.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(err("unshare(CLONE_NEWNS)"));
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(err("making / private"));
        }
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if libc::mount(c"none".as_ptr(), KERNEL_BTF_DIR.as_ptr(), c"tmpfs".as_ptr(), flags, c"size=4k".as_ptr().cast())
            != 0
        {
            return Err(err("tmpfs on /sys/kernel/btf"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounted_on_kernel_btf(mountinfo: &str) -> bool {
        mountinfo.lines().any(|l| l.split(' ').nth(4) == Some("/sys/kernel/btf"))
    }

    #[test]
    fn loaders_come_from_a_thread_that_alone_sees_no_kernel_btf() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "needs root (a mount namespace)");
            eprintln!("SKIPPED (not in CI): needs root (a mount namespace)");
            return;
        }
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            // No BTF (or hidden, as CI's no-BTF rerun does): nothing to hide.
            assert!(!hides_kernel_btf());
            let _a = new();
            return;
        }
        assert!(hides_kernel_btf(), "the loaders' namespace could not be made as root");
        let _a = new();
        let _b = new();
        // The rest of the process (this thread) still sees the kernel's BTF,
        // and nothing is mounted on it here.
        assert!(std::path::Path::new("/sys/kernel/btf/vmlinux").exists());
        assert!(!mounted_on_kernel_btf(&std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap()));
        assert!(!mounted_on_kernel_btf(&std::fs::read_to_string("/proc/1/mountinfo").unwrap()));
        // The loaders' thread has the tmpfs.
        let mut found = false;
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            if std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() == "ebpf-loaders" {
                found = mounted_on_kernel_btf(&std::fs::read_to_string(dir.join("mountinfo")).unwrap());
            }
        }
        assert!(found, "no ebpf-loaders thread with a tmpfs on /sys/kernel/btf");
    }
}
