#!/usr/bin/env bash
# Release builds of the agent for the device targets, with the eBPF objects
# embedded, and a table of their sizes:
#
#   cross/build.sh [TARGET ...]     (default: all three below)
#
#   aarch64-unknown-linux-musl    any arm64 box (Jetsons on JetPack 5 or 6):
#                                 one static file; the Debian package's
#   aarch64-unknown-linux-gnu     glibc 2.34+ (JetPack 6, Debian 12): the
#                                 package's `glibc` variant
#   riscv64gc-unknown-linux-gnu   RISC-V boards (glibc)
#
# Debian's cross gcc compiles the C parts (ring) and links the glibc
# targets; its g++ builds TF Lite (the anomaly model's runtime, crate
# tflite) for them, with libstdc++ linked in statically. Debian has no C++
# toolchain for aarch64 musl: the static target is built by zig (clang with
# musl and libc++ for the target, from PyPI, pinned: cross/zig/) through
# cargo-zigbuild, TF Lite included, so one file runs on any arm64 Linux
# (JetPack 5's glibc 2.31 too). The eBPF objects are the same for every
# target (built once by clang, little-endian BPF) and are inside the
# binary. Each binary is started once under qemu-user (--version) so a
# broken link shows here, and each build reproduces the shipped model's
# golden vectors there (TF Lite computes as the reference interpreter did
# on x86). Output: target/cross/<target>/edge-agent and
# target/cross/sizes.md. Installs what is missing first (scripts/setup.sh).
# CI builds the musl and riscv64 ones (hil-tests: the emulated boards and
# the Debian package); the glibc arm64 one is built by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-musl aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu)

scripts/setup.sh

export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CC_riscv64gc_unknown_linux_gnu=riscv64-linux-gnu-gcc

out=target/cross
mkdir -p "$out"
table="$out/sizes.md"
{
  echo "| target | linkage | TF Lite | edge-agent bytes | MiB |"
  echo "|---|---|---|---|---|"
} > "$table"
for t in "${targets[@]}"; do
  printf '\n\033[1m==> %s\033[0m\n' "$t" >&2
  build=(cargo build)
  tfl=yes
  case "$t" in
    aarch64-unknown-linux-musl)
      # cargo-zigbuild sets CC/CXX/AR and the linker to zig for this
      # target; TF Lite's Makefile gets zig through these wrappers. The
      # bindings (types only; the C++ objects stay behind pointers) are
      # generated against the gnu cross headers: the libclang here cannot
      # parse zig's newer libc++ headers.
      export PATH="$PWD/target/zig-venv/bin:$PATH"
      export TARGET_TOOLCHAIN_PREFIX="$PWD/cross/zig/aarch64-linux-musl-" TFLITE_RS_MAKE_TARGET=aarch64
      g=aarch64-linux-gnu
      args="--target=$g -I/usr/$g/include/c++/12 -I/usr/$g/include/c++/12/$g -I/usr/$g/include"
      args+=" -isystem $(clang -print-resource-dir)/include"
      # cargo-zigbuild points the target's bindgen arguments at zig's
      # headers unless set, under both spellings (no shell can export the
      # hyphenated one): ours win.
      export "BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_musl=$args"
      build=(env "BINDGEN_EXTRA_CLANG_ARGS_aarch64-unknown-linux-musl=$args" cargo zigbuild)
      ;;
    *-linux-gnu)
      triple="${t%%-*}-linux-gnu"
      triple="${triple/riscv64gc/riscv64}"
      v="${t//-/_}"
      export "CXX_$v=$triple-g++" TARGET_TOOLCHAIN_PREFIX="$triple-"
      # libstdc++ linked in statically: the binary then needs no
      # GLIBCXX_3.4.30 (GCC 12's libstdc++) on the device; JetPack 6's
      # Ubuntu 22.04 has it, older userlands do not.
      export "CXXSTDLIB_STATIC_$v=1"
      export "BINDGEN_EXTRA_CLANG_ARGS_$v=--target=$triple -I/usr/$triple/include/c++/12 -I/usr/$triple/include/c++/12/$triple -I/usr/$triple/include"
      ;;
  esac
  "${build[@]}" --locked --release --target "$t" -p edge-agent --bin edge-agent
  unset TARGET_TOOLCHAIN_PREFIX TFLITE_RS_MAKE_TARGET
  mkdir -p "$out/$t"
  cp "target/$t/release/edge-agent" "$out/$t/edge-agent"
  bin="$out/$t/edge-agent"
  case "$t" in
    aarch64-*) qemu=(qemu-aarch64-static -L /usr/aarch64-linux-gnu) ;;
    riscv64*) qemu=(qemu-riscv64-static -L /usr/riscv64-linux-gnu) ;;
    *) qemu=() ;;
  esac
  "${qemu[@]}" "$bin" --version >/dev/null || { echo "$bin does not start under ${qemu[*]}" >&2; exit 1; }
  # TF Lite on the target computes the shipped model as the reference
  # interpreter did on x86 (its golden vectors).
  if [[ $tfl == yes ]]; then
    "${qemu[@]}" "$bin" model check model/shipped/anomaly.card.json >&2
  fi
  if readelf -l "$bin" | grep -q 'program interpreter'; then link=dynamic; else link=static; fi
  size=$(stat -c %s "$bin")
  awk -v t="$t" -v l="$link" -v f="$tfl" -v s="$size" 'BEGIN { printf "| %s | %s | %s | %d | %.2f |\n", t, l, f, s, s / 1048576 }' >> "$table"
done
echo
cat "$table"
