#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian 12, as root.
# Idempotent: only installs what is missing. Used by scripts/test.sh and
# scripts/demo.sh; run it alone to prepare a machine.
#   scripts/setup.sh          everything (tests, cross builds)
#   scripts/setup.sh --demo   only what the demo needs
set -euo pipefail

demo_only=0
[[ "${1:-}" == "--demo" ]] && demo_only=1

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, and the eBPF probes need CAP_BPF/CAP_PERFMON)"
command -v cargo >/dev/null && command -v rustup >/dev/null \
  || die "cargo and rustup are needed (a Rust toolchain from rustup, Rust >= 1.87)"

# g++, make, libclang-dev: TF Lite (crate tflite) and its bindings; python3-venv: model/run.sh.
packages=(clang llvm libbpf-dev bpftool gcc g++ make libclang-dev mosquitto mosquitto-clients prometheus curl openssl nftables iproute2 faketime
          python3 python3-venv)
if [[ $demo_only -eq 0 ]]; then
  packages+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross
             gcc-riscv64-linux-gnu g++-riscv64-linux-gnu libc6-dev-riscv64-cross
             qemu-user-static qemu-system-arm qemu-system-misc opensbi cpio file kmod
             xz-utils gpgv debian-archive-keyring device-tree-compiler
             victoria-metrics   # the second remote-write store of the e2e tests
             nats-server)       # the clustered broker (hil-tests fleet, docs/scaling.md)
fi

# The emulated board (hil-tests/image.sh) boots Debian's arm64 kernel
# package and BusyBox, downloaded with apt: apt must know the arm64 packages.
new_arch=0
if [[ $demo_only -eq 0 ]] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  say "dpkg --add-architecture arm64 (hil-tests download Debian's arm64 kernel)"
  dpkg --add-architecture arm64
  new_arch=1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} || new_arch)); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
fi
if ((${#missing[@]})); then
  say "installing: ${missing[*]}"
  # The packaged mosquitto and prometheus services are not wanted: the demo
  # and tests start their own instances on loopback.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts freshly installed services; ours would then collide with
  # the demo's own instances on 1883 and 9090. Only touch what we installed.
  if [[ -d /run/systemd/system ]]; then
    for svc in mosquitto prometheus victoria-metrics nats-server; do
      if [[ " ${missing[*]} " == *" $svc "* ]]; then
        say "disabling the packaged $svc service (the demo and tests run their own)"
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
      fi
    done
  fi
fi

if [[ $demo_only -eq 0 ]]; then
  targets=(aarch64-unknown-linux-gnu aarch64-unknown-linux-musl riscv64gc-unknown-linux-gnu)
  installed=$(rustup target list --installed)
  for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed" || { say "rustup target add $t"; rustup target add "$t"; }
  done
  # Fuzzing (cargo fuzz) needs a nightly toolchain and cargo-fuzz.
  rustup toolchain list | grep -q '^nightly' || { say "rustup toolchain install nightly"; rustup toolchain install nightly --profile minimal; }
  command -v cargo-fuzz >/dev/null || { say "cargo install cargo-fuzz"; cargo install cargo-fuzz --locked -q; }
  # The static aarch64 agent's C/C++ toolchain (cross/build.sh): zig and
  # cargo-zigbuild from PyPI, pinned, in their own venv; `zig` linked into
  # its bin/ (cross/build.sh puts that first in PATH).
  zv=target/zig-venv
  if ! "$zv/bin/zig" version >/dev/null 2>&1 || ! "$zv/bin/cargo-zigbuild" --version >/dev/null 2>&1; then
    say "installing zig and cargo-zigbuild into $zv (cross/zig/requirements.txt)"
    python3 -m venv "$zv"
    "$zv/bin/pip" install -q --require-hashes -r cross/zig/requirements.txt
    ln -sf "$("$zv/bin/python" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')" "$zv/bin/zig"
  fi
  # The Debian package (packaging/build-deb.sh, hil-tests/tests/debian_package.rs).
  command -v cargo-deb >/dev/null || { say "cargo install cargo-deb"; cargo install cargo-deb --locked -q; }
  command -v rustfmt >/dev/null || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
say "ready"
