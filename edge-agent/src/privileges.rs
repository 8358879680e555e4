//! Started as root, the agent gives up root once its probes are loaded:
//! it becomes `run_as` (a system user, made by the Debian package) and keeps
//! only the capabilities that reloading the probes on SIGHUP needs. Store
//! and state files are handed to that user first.
//!
//! Kept (effective and permitted; nothing inheritable, no ambient):
//! * CAP_BPF, CAP_PERFMON: load BPF programs and attach them to tracepoints
//!   (perf events). Kernels before 5.8 know neither; there CAP_SYS_ADMIN is
//!   kept in their place, as it is what those kernels check.
//! * CAP_NET_ADMIN: the kernel requires it to load and attach `cgroup_skb`
//!   programs (the protocol probe).
//! * CAP_DAC_READ_SEARCH: tracefs (the tracepoints' `format` and `id` files
//!   the programs are built from) is readable by root only.
//! * CAP_SYS_PTRACE: the device probe finds device files other processes
//!   already hold by reading `/proc/<pid>/fd` links, which the kernel allows
//!   only to the same user or with this capability. Read-only use.
//!
//! Not kept, so after the drop: mounting tracefs or a cgroup v2 hierarchy
//! (done at start, before the drop) and turning BPF run-time statistics on
//! again after a reload (bpf(BPF_ENABLE_STATS) wants CAP_SYS_ADMIN; the
//! statistics stay on while any probe stays loaded).

use std::ffi::CString;
use std::path::Path;

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// What [`drop_root`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not started as root: nothing to give up.
    NotRoot,
    /// `run_as` is empty: the agent stays root, as configured.
    Disabled,
    /// Now running as this user with these capabilities.
    Dropped { user: String, uid: u32, gid: u32, caps: Vec<&'static str> },
}

/// The capabilities kept, by number and name, for a kernel whose highest
/// capability is `last_cap` (/proc/sys/kernel/cap_last_cap).
pub fn kept_capabilities(last_cap: u32) -> Vec<(u32, &'static str)> {
    let mut caps = vec![
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
    ];
    if last_cap >= CAP_BPF {
        caps.extend([(CAP_PERFMON, "CAP_PERFMON"), (CAP_BPF, "CAP_BPF")]);
    } else {
        caps.push((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"));
    }
    caps
}

/// Becomes `user` if running as root and `user` is not empty, after giving
/// it `state_dir` (recursively). An unknown user is an error naming it: the
/// caller keeps running as root and says so.
pub fn drop_root(user: &str, state_dir: &Path) -> Result<Outcome, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Outcome::NotRoot);
    }
    if user.is_empty() {
        return Ok(Outcome::Disabled);
    }
    let (uid, gid) = lookup(user)?;
    chown_tree(state_dir, uid, gid).map_err(|e| format!("giving {} to {user}: {e}", state_dir.display()))?;

    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_SYS_ADMIN + 1);
    let caps = kept_capabilities(last_cap);
    let mask = mask_of(&caps);

    // Keep the permitted set across setuid, switch group and user (libc
    // applies both to every thread), then cut the sets down to `mask`.
    // SAFETY: plain syscalls with valid arguments; failures are checked.
    unsafe {
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")?;
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setgid(gid), "setgid")?;
        check(libc::setuid(uid), "setuid")?;
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")?;
    }
    capset(mask)?;
    // SAFETY: as above. Kernels before 4.3 have no ambient set (EINVAL):
    // nothing to clear there.
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")?;
    }
    Ok(Outcome::Dropped { user: user.to_owned(), uid, gid, caps: caps.iter().map(|(_, n)| *n).collect() })
}

fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

fn lookup(user: &str) -> Result<(u32, u32), String> {
    let name = CString::new(user).map_err(|_| format!("run_as {user:?}: not a user name"))?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of pw.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(format!(
            "run_as = {user:?}: no such user (the Debian package creates it; \
             `useradd --system {user}`, or run_as = \"\" to stay root)"
        ));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capset(mask: u64) -> Result<(), String> {
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let lo = CapData { effective: mask as u32, permitted: mask as u32, inheritable: 0 };
    let hi = CapData { effective: (mask >> 32) as u32, permitted: (mask >> 32) as u32, inheritable: 0 };
    let data = [lo, hi];
    // SAFETY: header and two data structs, as capset(2) wants for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("capset: {}", std::io::Error::last_os_error()))
    }
}

/// The capability bit mask of a list of capabilities.
fn mask_of(caps: &[(u32, &str)]) -> u64 {
    caps.iter().fold(0, |m, (c, _)| m | 1 << c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_kept_follow_the_kernel() {
        // 5.8+ (CAP_BPF = 39 exists): no CAP_SYS_ADMIN.
        let kept_mask = |last_cap| mask_of(&kept_capabilities(last_cap));
        assert_eq!(kept_mask(40), 1 << 2 | 1 << 12 | 1 << 19 | 1 << 38 | 1 << 39);
        // 5.4 (Jetson's older L4T; last cap 37): CAP_SYS_ADMIN in their place.
        assert_eq!(kept_mask(37), 1 << 2 | 1 << 12 | 1 << 19 | 1 << 21);
    }

    #[test]
    fn unknown_user_is_named() {
        if unsafe { libc::geteuid() } != 0 {
            return; // not root: nothing is dropped, the lookup is not reached
        }
        let e = drop_root("no-such-user-edge", Path::new("/nonexistent")).unwrap_err();
        assert!(e.contains("no-such-user-edge") && e.contains("useradd"), "{e}");
    }
}
