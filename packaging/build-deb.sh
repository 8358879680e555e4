#!/usr/bin/env bash
# The Debian package (JetPack's Ubuntu and Debian, arm64):
#
#   packaging/build-deb.sh [TARGET]     default aarch64-unknown-linux-gnu
#
# Builds the agent with cross/build.sh, then packs it with cargo-deb
# (metadata in edge-agent/Cargo.toml; unit, sysusers entry and postinst in
# packaging/debian/). Output: target/debian/edge-agent_<version>_<arch>.deb.
#
#   aarch64-unknown-linux-gnu    (default) with TF Lite and the shipped
#                                anomaly model; needs glibc 2.34: JetPack 6
#                                (Ubuntu 22.04), Debian 12
#   aarch64-unknown-linux-musl   the `static` variant: any userland (JetPack
#                                5's glibc 2.31 too); the same model, TF
#                                Lite built in by zig (musl, libc++)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-aarch64-unknown-linux-gnu}
variant=()
case "$target" in
  *-musl) variant=(--variant static) ;;
esac
cross/build.sh "$target"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked -q
# cross/build.sh's release build is already stripped (profile.release).
cargo deb -p edge-agent --target "$target" "${variant[@]}" --no-build --no-strip
