#!/usr/bin/env bash
# Runs every test: formatting and lints, unit and store tests, the
# end-to-end tests on the real kernel with real mosquitto and Prometheus, and
# the agent's tests cross-built for aarch64 and riscv64 under qemu-user.
# Installs whatever is missing first. Needs root. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

step "setup"
scripts/setup.sh

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries (the end-to-end tests run them)"
cargo build --workspace --bins --locked

step "tests (unit, store, end to end)"
cargo test --workspace --locked

for target in aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
  step "agent tests on $target under qemu-user"
  cargo test --locked --target "$target" -p edge-agent -p edge-wire
done
