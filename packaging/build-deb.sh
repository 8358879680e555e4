#!/usr/bin/env bash
# The Debian package (JetPack's Ubuntu and Debian, arm64):
#
#   packaging/build-deb.sh [TARGET]     default aarch64-unknown-linux-musl
#
# Builds the agent with cross/build.sh, then packs it with cargo-deb
# (metadata in edge-agent/Cargo.toml; unit, sysusers entry and postinst in
# packaging/debian/). Output: target/debian/edge-agent_<version>_<arch>.deb.
#
#   aarch64-unknown-linux-musl   (default) one static file: any arm64
#                                userland (JetPack 5's glibc 2.31, JetPack
#                                6, Debian); TF Lite built in by zig (musl,
#                                libc++), the shipped anomaly model
#   aarch64-unknown-linux-gnu    the `glibc` variant: the same agent and
#                                model built by Debian's gcc; needs glibc
#                                2.34: JetPack 6 (Ubuntu 22.04), Debian 12
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-aarch64-unknown-linux-musl}
variant=()
case "$target" in
  aarch64-unknown-linux-musl) ;;
  aarch64-unknown-linux-gnu) variant=(--variant glibc) ;;
  *) echo "build-deb.sh: no package for $target (aarch64-unknown-linux-musl or aarch64-unknown-linux-gnu)" >&2; exit 2 ;;
esac
cross/build.sh "$target"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked -q
# cross/build.sh's release build is already stripped (profile.release).
cargo deb -p edge-agent --target "$target" "${variant[@]}" --no-build --no-strip
