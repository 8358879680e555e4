//! Compiles the kernel side (C, in ../ebpf) with clang into BPF objects that
//! the agent embeds with `include_bytes!`. BPF bytecode does not depend on the
//! target we build the agent for (all our targets are little-endian), so the
//! same command serves native and cross builds.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["tcp_lifecycle", "device_io", "protocols", "buses", "empty"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets this"));
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());

    // More clang flags, e.g. -I for libbpf's and the kernel's UAPI headers
    // in a cross sysroot (Buildroot's staging directory).
    let extra: Vec<String> =
        std::env::var("BPF_EXTRA_CFLAGS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();

    // TF Lite on riscv64 uses atomics that glibc's riscv64 gcc leaves to
    // libatomic (the linker must see it even though Rust does not ask).
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("riscv64")
        && std::env::var_os("CARGO_FEATURE_TFLITE").is_some()
    {
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-latomic,--pop-state");
    }

    println!("cargo:rerun-if-env-changed=BPF_CLANG");

    // A time the true time cannot be before: when this build script ran
    // (SOURCE_DATE_EPOCH for reproducible builds). The uplink checks the
    // broker's certificate at no earlier time (crate::clock::time_floor).
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let built =
        std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
        });
    println!("cargo:rustc-env=EDGE_AGENT_BUILT_UNIX={built}");
    println!("cargo:rerun-if-env-changed=BPF_EXTRA_CFLAGS");
    println!("cargo:rerun-if-changed={}", ebpf.join("include").display());

    // <linux/types.h> needs <asm/types.h>, which Debian keeps in the host's
    // multiarch directory. Its contents are the same on every architecture.
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());

    for prog in PROGRAMS {
        let src = ebpf.join("src").join(format!("{prog}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!("{prog}.bpf.o"));
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpfel", "-Wall", "-Werror"]).arg("-I").arg(ebpf.join("include"));
        cmd.args(&extra);
        if let Some(m) = &multiarch {
            cmd.arg(format!("-I/usr/include/{m}"));
        }
        cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
        let status = cmd.status().unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} to build the eBPF programs: {e}. \
                 Install clang and libbpf-dev (scripts/setup.sh does), or set BPF_CLANG."
            )
        });
        assert!(status.success(), "{clang} failed to compile {}", src.display());
    }
}
