#!/usr/bin/env bash
# The Debian package (JetPack's Ubuntu and Debian, arm64):
#
#   packaging/build-deb.sh [TARGET]     default aarch64-unknown-linux-musl
#
# Builds the agent with cross/build.sh, then packs it with cargo-deb
# (metadata in edge-agent/Cargo.toml; unit, sysusers entry and postinst in
# packaging/debian/). Output: target/debian/edge-agent_<version>_<arch>.deb.
# The static musl binary is the default: it runs on any glibc (a glibc
# build from Debian 12 needs GLIBC_2.34; JetPack 5 has 2.31).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-aarch64-unknown-linux-musl}
cross/build.sh "$target"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked -q
# cross/build.sh's release build is already stripped (profile.release).
cargo deb -p edge-agent --target "$target" --no-build --no-strip
