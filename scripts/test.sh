#!/usr/bin/env bash
# Runs every test: formatting and lints, unit and store tests, the
# end-to-end tests on the real kernel with real mosquitto and Prometheus, and
# the agent's tests cross-built for aarch64 and riscv64 under qemu-user, and
# the cross-built agent on emulated arm64 and riscv64 boards (qemu-system).
# Installs whatever is missing first. Needs root. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m (%s, %d s in)\n' "$*" "$(date -u +%T)" "$SECONDS" >&2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Runs a cargo test command, keeping its output for the total at the end.
run_tests() { "$@" 2>&1 | tee -a "$log"; }

step "setup"
scripts/setup.sh

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "central configs (promtool)"
promtool check config configs/prometheus.yml
promtool test rules configs/rules/edge.rules.test.yml
rule_tests=$(grep -c '^  - name:' configs/rules/edge.rules.test.yml)
echo "test result: ok. $rule_tests passed; 0 failed; (promtool rule tests)" | tee -a "$log"

step "build binaries (the end-to-end tests run them) and tests"
# One cargo invocation for the binaries and the tests, with the package
# selection of the test step below: the same features, so that step builds
# nothing again (with `--bins` alone the dev-dependencies change the build
# scripts' host dependencies and TF Lite's C++ was built a second time).
cargo build --workspace --exclude hil-tests --bins --tests --locked

step "tests (unit, store, end to end)"
run_tests cargo test --workspace --locked --exclude hil-tests

step "the model pipeline's unit tests (model/test_pipeline.py)"
run_tests model/run.sh test

step "probe tests again with the kernel's BTF hidden (the baseline a 5.10 kernel without BTF gets)"
EDGE_E2E_HIDE_BTF=1 run_tests cargo test --locked -p e2e --test probes --test devices --test protocols --test values

# Under qemu-user a test cannot start another target binary (that would need
# binfmt_misc), so the tests that spawn the agent or a child writer
# (store_tools, store_crash) and those needing a broker run natively only.
# The agent's own tests run on riscv64 (the issue's foreign-arch target);
# on aarch64 only the wire format's, for time (45 minutes in all): the
# arm64 board below runs the agent and its store on aarch64 for real, and
# riscv64 is as foreign (64-bit, little-endian, weakly ordered).
for target in aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
  step "agent tests on $target under qemu-user"
  run_tests cargo test --locked --target "$target" -p edge-wire --lib
  [[ $target == riscv64* ]] || continue
  # Without TF Lite (--no-default-features): these are the store's tests;
  # the glibc release builds below carry TF Lite (cross/build.sh).
  # The delivery simulation: 100 of its seeded runs here (1,000 natively).
  EDGE_SIM_RUNS=100 run_tests cargo test --locked --target "$target" -p edge-agent --no-default-features --lib \
    --test store_files --test store_model --test store_regressions --test store_disk_full
done

step "emulated arm64 and riscv64 boards: cross-built agent, Debian's kernels, the Buildroot overlay; the Debian packages (hil-tests)"
# The static arm64 agent (zig: musl, libc++, TF Lite) boots on the arm64
# board and is the Debian package; the riscv64 agent (glibc, TF Lite) boots
# on the riscv64 board. The glibc arm64 build (the package's `glibc`
# variant) is built and tested by hand, for time: README, "Builds".
cross/build.sh aarch64-unknown-linux-musl riscv64gc-unknown-linux-gnu
run_tests cargo test --locked -p hil-tests -- --nocapture

step "fuzzing, ${FUZZ_SECONDS:-10} s per target (corpus in fuzz/corpus, fuzz-model/corpus)"
fuzz_log=$(mktemp)
fuzz_runs=0
# fuzz/: the store and wire formats, without TF Lite; fuzz-model/: model
# file bytes through the agent's load (TF Lite inside: a build of its own).
for dir_target in fuzz/record fuzz/block fuzz/store_open fuzz-model/model; do
  dir=${dir_target%/*} target=${dir_target#*/}
  if ! cargo +nightly fuzz run --fuzz-dir "$dir" "$target" -- -max_total_time="${FUZZ_SECONDS:-10}" > "$fuzz_log" 2>&1; then
    # The cause (a panic's message, a sanitizer's summary) comes before
    # libFuzzer's long tail; the input travels in the log as base64, so a
    # crash found in CI reproduces here (base64 -d > crash; cargo fuzz run
    # --fuzz-dir $dir $target crash).
    grep -E -A2 "panicked at|^SUMMARY|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$fuzz_log" | head -40
    tail -20 "$fuzz_log"
    for crash in "$dir/artifacts/$target"/*; do
      [[ -f "$crash" && $(stat -c %s "$crash") -le 65536 ]] || continue
      echo "input $crash, base64:"
      base64 -w 120 "$crash"
    done
    echo "fuzz target $target failed; the input is in $dir/artifacts/$target" >&2
    exit 1
  fi
  echo "fuzz $target: $(grep -E '^Done [0-9]+ runs' "$fuzz_log" | tail -1)"
  fuzz_runs=$((fuzz_runs + 1))
done
rm -f "$fuzz_log"
echo "test result: ok. $fuzz_runs passed; 0 failed; (fuzz targets, no crash)" >> "$log"

echo "whole run: $SECONDS s" >&2
grep '^test result:' "$log" | awk '{ for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "\ntotal: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }'
