//! The emulated boards: boot files from `hil-tests/image.sh`, booted by
//! qemu-system-aarch64 or qemu-system-riscv64 (TCG), its serial console in a file the test reads,
//! its QEMU monitor on a unix socket (to cut the network link and restore
//! it), user-mode networking (the guest reaches the host's loopback at
//! 10.0.2.2).

pub mod evaluation;
pub mod fleet;
pub mod workload;

use e2e::{repo_dir, wait_for, Proc};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// An emulated board's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// qemu-system-aarch64 `virt`, Cortex-A72: Jetson-class.
    Arm64,
    /// qemu-system-riscv64 `virt` with OpenSBI.
    Riscv64,
}

impl Arch {
    /// Debian's name, as image.sh takes it (`HIL_ARCH`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::Riscv64 => "riscv64",
        }
    }

    /// The cross-built agent the image carries (`HIL_AGENT_<ARCH>`
    /// overrides), TF Lite in both: on arm64 the static build the Debian
    /// package carries, on riscv64 the glibc build (image.sh adds its
    /// libraries). `HIL_AGENT_ARM64=target/cross/aarch64-unknown-linux-gnu/edge-agent`
    /// boots the glibc arm64 build (the package's `glibc` variant).
    pub fn agent(self) -> PathBuf {
        let (var, target) = match self {
            Arch::Arm64 => ("HIL_AGENT_ARM64", "aarch64-unknown-linux-musl"),
            Arch::Riscv64 => ("HIL_AGENT_RISCV64", "riscv64gc-unknown-linux-gnu"),
        };
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_dir().join(format!("target/cross/{target}/edge-agent")))
    }

    /// qemu-user for this architecture and the sysroot (Debian's cross
    /// libc) its glibc binaries load their libraries from.
    pub fn qemu_user(self) -> (&'static str, &'static str) {
        match self {
            Arch::Arm64 => ("qemu-aarch64-static", "/usr/aarch64-linux-gnu"),
            Arch::Riscv64 => ("qemu-riscv64-static", "/usr/riscv64-linux-gnu"),
        }
    }

    /// Whether the agent can run an anomaly model: its `--version` says,
    /// under qemu-user.
    pub fn agent_has_tflite(self) -> bool {
        let (qemu, sysroot) = self.qemu_user();
        let out = std::process::Command::new(qemu)
            .args(["-L", sysroot])
            .arg(self.agent())
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{qemu} {}: {e}", self.agent().display()));
        let v = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && v.starts_with("edge-agent "), "{} --version: {v}", self.agent().display());
        !v.contains("no TF Lite")
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::Arm64 => "qemu-system-aarch64",
            Arch::Riscv64 => "qemu-system-riscv64",
        }
    }

    /// The serial console's device name on this board.
    pub fn console(self) -> &'static str {
        match self {
            Arch::Arm64 => "ttyAMA0",
            Arch::Riscv64 => "ttyS0",
        }
    }

    fn machine(self) -> Vec<&'static str> {
        match self {
            Arch::Arm64 => vec!["-machine", "virt", "-cpu", "cortex-a72"],
            Arch::Riscv64 => vec!["-machine", "virt", "-cpu", "rv64", "-bios", "default"],
        }
    }
}

/// Whether the boot test can run here: in CI (`CI` set) a missing part is a
/// failure, elsewhere the test is skipped with the reason printed.
pub fn require_board_tools(arch: Arch) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (a private network namespace for the fleet side)".to_string());
    }
    for tool in [arch.qemu(), arch.qemu_user().0, "cpio", "gpgv", "dtc", "mosquitto", "prometheus"] {
        if e2e::which(tool).is_none() {
            missing.push(format!("{tool} (scripts/setup.sh installs it)"));
        }
    }
    if !arch.agent().exists() {
        missing.push(format!("the {arch:?} agent at {} (cross/build.sh)", arch.agent().display()));
    }
    if !e2e::bin_dir().join("fleet-bridge").exists() {
        missing.push("fleet-bridge (cargo build --workspace --bins)".into());
    }
    e2e::require("the boot test", &missing)
}

/// Moves the calling thread (and every process it starts from now on) into
/// a new network namespace with only a loopback interface: the fleet side
/// can listen on the ports the device's default config names (8883) without
/// colliding with anything on the machine. QEMU started from this thread
/// forwards the guest's 10.0.2.2 to this namespace's loopback.
pub fn private_network() {
    // SAFETY: unshare(CLONE_NEWNET) affects only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    let ok = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
    assert!(ok.success(), "ip link set lo up failed");
}

/// Boot files made by `hil-tests/image.sh`.
pub struct Image {
    pub arch: Arch,
    pub dir: PathBuf,
    /// Debian's kernel package and version, as image.sh wrote it.
    pub kernel: String,
}

/// Runs hil-tests/image.sh for `arch` with `args`; its stderr (what it did).
fn image_sh(arch: Arch, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(repo_dir().join("hil-tests/image.sh"))
        .env("HIL_ARCH", arch.debian())
        .args(args)
        .output()
        .expect("hil-tests/image.sh");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "hil-tests/image.sh {args:?} failed:\n{}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

impl Image {
    /// Downloads (and verifies) the board's packages, unless cached: before
    /// the test moves into its private network namespace, which has no
    /// route out.
    pub fn fetch(arch: Arch) {
        image_sh(arch, &["--fetch".as_ref()]);
    }

    /// Runs image.sh: Debian's kernel, BusyBox, the agent, the Buildroot
    /// overlay, and `provision` copied over the root last.
    pub fn build(arch: Arch, dir: &Path, provision: &Path) -> Image {
        let dir = dir.join("image");
        let agent = arch.agent();
        eprint!("{}", image_sh(arch, &[dir.as_os_str(), agent.as_os_str(), provision.as_os_str()]));
        let kernel = std::fs::read_to_string(dir.join("kernel.txt")).expect("kernel.txt").trim().to_owned();
        Image { arch, dir, kernel }
    }
}

/// The arm64 board's device tree: the one QEMU's virt machine makes for
/// these exact options (dumped, decompiled), with the sensor buses of
/// `hil-tests/image/arm64-buses.dtsi` added.
fn board_dtb(dir: &Path, args: &[String]) -> PathBuf {
    let (virt, dts, dtb) = (dir.join("virt.dtb"), dir.join("board.dts"), dir.join("board.dtb"));
    let dump: Vec<String> =
        args.iter().map(|a| if a == "virt" { format!("virt,dumpdtb={}", virt.display()) } else { a.clone() }).collect();
    let run = |program: &str, args: &[String]| {
        let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    run("qemu-system-aarch64", &dump);
    let mut source =
        run("dtc", &["-q".into(), "-I".into(), "dtb".into(), "-O".into(), "dts".into(), virt.display().to_string()]);
    source.extend(std::fs::read(repo_dir().join("hil-tests/image/arm64-buses.dtsi")).expect("arm64-buses.dtsi"));
    std::fs::write(&dts, source).expect("board.dts");
    let to_dtb = ["-q", "-I", "dts", "-O", "dtb", "-o"].map(String::from);
    run("dtc", &[&to_dtb[..], &[dtb.display().to_string(), dts.display().to_string()]].concat());
    dtb
}

/// The rest of every *complete* console line holding `tag` (after it). A
/// line the board is still printing (no newline yet) is not one: read
/// half-written, "init at uptime 2.22 s, kernel ... riscv64" was once cut
/// to "... kern" and failed the architecture check.
fn complete_lines_tagged(console: &str, tag: &str) -> Vec<String> {
    let complete = console.rfind('\n').map_or("", |end| &console[..end]);
    complete.lines().filter_map(|l| l.find(tag).map(|i| l[i + tag.len()..].trim().to_owned())).collect()
}

/// A booted board; QEMU is killed when it drops.
pub struct Board {
    pub proc: Proc,
    console: PathBuf,
    monitor: PathBuf,
    /// When QEMU was started (wall clock, ms): the device's clock comes
    /// from the emulated RTC, which starts at the host's time.
    pub started_ms: i64,
    pub started: Instant,
}

impl Board {
    pub fn boot(dir: &Path, image: &Image) -> Board {
        let console = dir.join("console.log");
        let monitor = dir.join("monitor.sock");
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&monitor);
        let mut args: Vec<String> = image.arch.machine().iter().map(|s| s.to_string()).collect();
        args.extend(
            [
                "-smp",
                "2",
                "-m",
                "512",
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
                "-rtc",
                "base=utc",
                "-kernel",
                &image.dir.join("kernel.img").display().to_string(),
                "-initrd",
                &image.dir.join("initrd.img").display().to_string(),
                "-append",
                &format!("console={} panic=-1 loglevel=4", image.arch.console()),
                "-serial",
                &format!("file:{}", console.display()),
                "-monitor",
                &format!("unix:{},server=on,wait=off", monitor.display()),
                "-netdev",
                "user,id=net0,net=10.0.2.0/24",
                "-device",
                "virtio-net-pci,netdev=net0,romfile=",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if image.arch == Arch::Arm64 {
            let dtb = board_dtb(dir, &args);
            args.extend(["-dtb".to_string(), dtb.display().to_string()]);
        }
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&monitor);
        let started_ms = e2e::now_ms();
        let started = Instant::now();
        let proc = Proc::spawn("qemu", dir, Path::new(image.arch.qemu()), &args, &[]);
        Board { proc, console, monitor, started_ms, started }
    }

    /// Everything the board printed on its serial console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The console's lines starting `hil: <prefix>`, without that.
    pub fn hil_lines(&self, prefix: &str) -> Vec<String> {
        complete_lines_tagged(&self.console(), &format!("hil: {prefix}"))
    }

    /// Waits for a console line `hil: <prefix>...`; returns the first.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        wait_for(&format!("the board to print 'hil: {prefix}'"), timeout, || {
            self.proc.assert_running();
            self.hil_lines(prefix).into_iter().next().ok_or_else(|| self.console_tail())
        })
    }

    /// The console's last 40 lines, after the agent's warnings, errors and
    /// probes not attached (from the start: what a failed check needs).
    pub fn console_tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        let notable: Vec<&str> = lines
            .iter()
            .filter(|l| !l.starts_with("hil: "))
            .filter(|l| ["WARN", "ERROR", "unavailable", "failed", "refused"].iter().any(|w| l.contains(w)))
            .take(30)
            .copied()
            .collect();
        format!("{}\n...\n{}", notable.join("\n"), lines[lines.len().saturating_sub(40)..].join("\n"))
    }

    /// One QEMU monitor command; returns what the monitor answered.
    pub fn monitor(&self, cmd: &str) -> String {
        let mut s = wait_for("the QEMU monitor socket", Duration::from_secs(10), || UnixStream::connect(&self.monitor));
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let read_prompt = |s: &mut UnixStream| {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"(qemu) ") {
                let n = s.read(&mut buf).expect("QEMU monitor read");
                assert!(n > 0, "QEMU monitor closed");
                got.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&got).into_owned()
        };
        read_prompt(&mut s);
        s.write_all(format!("{cmd}\n").as_bytes()).expect("QEMU monitor write");
        read_prompt(&mut s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_still_being_printed_is_not_read() {
        let half = "boot\nhil: init at uptime 2.22 s, kern";
        assert!(complete_lines_tagged(half, "hil: init at uptime").is_empty());
        let whole = "boot\nhil: init at uptime 2.22 s, kernel 6.12 riscv64\nhil: agent st";
        assert_eq!(complete_lines_tagged(whole, "hil: init at uptime"), ["2.22 s, kernel 6.12 riscv64"]);
        assert!(complete_lines_tagged(whole, "hil: agent started").is_empty());
    }
}
