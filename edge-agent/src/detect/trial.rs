//! A trial load in a forked child: TF Lite 1.15 reads a model's flatbuffer
//! without verifying it, so a truncated or bit-flipped file whose hash
//! matches its card (a damaged flash, a hostile card) can crash the process
//! that parses it (SIGSEGV). The agent first builds and self-tests every
//! model in a child forked for that alone; only when the child finished
//! (loaded, or refused with an error) does the agent load the same bytes
//! itself, so the same deterministic code cannot crash it. A child killed
//! by a signal, or still busy after the timeout, means the file is refused,
//! named, and the agent runs on without detection.
//!
//! Why fork and not a flatbuffers verifier: the crash can come from any
//! layer (structure, tensor indices, buffer sizes, an operator's own
//! checks), and a child catches all of them, for the few milliseconds a
//! fork costs once per model load (BENCHMARKS.md, "Model trial load").
//! The child touches no lock another thread could hold at the fork: it runs
//! TF Lite and the self-test only (glibc and musl keep malloc usable in a
//! forked child), and leaves with `_exit`.

use std::time::{Duration, Instant};

/// How long a trial may take: a model that loads and self-tests within a
/// few milliseconds normally; one still busy after this is refused.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Why a trial failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrialError {
    #[error("TF Lite crashed on it in a trial load (signal {0}): a damaged or hostile file")]
    Crashed(i32),
    #[error("the TF Lite bindings panicked on it in a trial load: a damaged or hostile file")]
    Panicked,
    #[error(
        "its trial load ended abnormally (exit code {0}: a crash handler or sanitizer ended it): a damaged or \
         hostile file"
    )]
    Exited(i32),
    #[error("its trial load did not finish within {0:?}: refused")]
    TimedOut(Duration),
    #[error("cannot fork a trial load: {0}")]
    Fork(String),
}

/// Runs `f` in a forked child and returns once it finished normally,
/// whether `f` succeeded or not (the caller then runs the same work in
/// this process and gets its result). `Err` when the child died by a
/// signal, panicked (which aborts a release build), or ran past `timeout`.
pub fn run<F: FnOnce() -> bool>(timeout: Duration, f: F) -> Result<(), TrialError> {
    // SAFETY: fork(2); the child runs `f` and leaves with _exit, never
    // returning into the parent's code (see the module's note on locks).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(TrialError::Fork(std::io::Error::last_os_error().to_string()));
    }
    if pid == 0 {
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(true) => BUILT,
            Ok(false) => REFUSED,
            Err(_) => PANICKED,
        };
        // SAFETY: ends the child at once, without running the parent's
        // atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // A model loads in well under a millisecond: poll often at first.
    let mut pause = Duration::from_micros(50);
    loop {
        // SAFETY: waitpid on our own child, status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TrialError::Fork(format!("waitpid: {e}")));
        }
        if Instant::now() >= deadline {
            // SAFETY: kill and reap our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(TrialError::TimedOut(timeout));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
    if libc::WIFSIGNALED(status) {
        return Err(TrialError::Crashed(libc::WTERMSIG(status)));
    }
    match libc::WEXITSTATUS(status) {
        BUILT | REFUSED => Ok(()),
        PANICKED => Err(TrialError::Panicked),
        // Not one of ours: something else ended the child (a library's or
        // a sanitizer's crash handler that exits instead of dying by the
        // signal): the work did not finish.
        code => Err(TrialError::Exited(code)),
    }
}

/// The child's exit codes: `f` finished and succeeded; finished and
/// failed; panicked (where panics unwind: tests). Uncommon values, so that
/// a handler's exit (1, 77, ...) is never taken for a finish.
const BUILT: i32 = 40;
const REFUSED: i32 = 41;
const PANICKED: i32 = 42;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_in_the_child_is_reported_and_this_process_runs_on() {
        let crash = run(TIMEOUT, || {
            // SAFETY: deliberately the crash a bad model causes (std's own
            // SIGSEGV handler, for stack overflows, set aside first).
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            true
        });
        assert_eq!(crash, Err(TrialError::Crashed(libc::SIGSEGV)));
        assert_eq!(run(TIMEOUT, || true), Ok(()));
        assert_eq!(run(TIMEOUT, || false), Ok(()), "an error is the caller's to find, in this process");
        assert_eq!(run(TIMEOUT, || panic!("in the child")), Err(TrialError::Panicked));
        // A crash handler that exits (libFuzzer's: 77; ASan's: 1) is no
        // finish: before, exit code 1 read as "finished, failed", and this
        // process then ran the work itself.
        for code in [1, 77] {
            // SAFETY: ends the child as such a handler does.
            let exited = run(TIMEOUT, || unsafe { libc::_exit(code) });
            assert_eq!(exited, Err(TrialError::Exited(code)));
        }
        let slow = run(Duration::from_millis(100), || {
            std::thread::sleep(Duration::from_secs(30));
            true
        });
        assert_eq!(slow, Err(TrialError::TimedOut(Duration::from_millis(100))));
    }
}
