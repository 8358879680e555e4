#!/usr/bin/env bash
# The main job on one machine: mosquitto, Prometheus, fleet-bridge and
# edge-agent on loopback, each on its built-in defaults (no config file for
# the bridge; the agent's holds only the shipped tag map), and a simulated
# PLC serving a pump over Modbus/TCP (port 502) and Modbus RTU (a
# pseudo-terminal at /run/pump-sim/ttyPLC), polled by its HMI once a second
# (e2e/src/bin/pump_sim.rs). Needs root (the agent loads eBPF programs).
#
#   scripts/demo.sh                 run until Ctrl-C
#   scripts/demo.sh --for 60        run 60 s, then print what arrived and stop
#
# Ports (the defaults): mosquitto 8883 (devices, TLS client certificates),
# 8884 (devices, passwords), 8885 (bridges), Prometheus 9090, agent /metrics
# 9464, bridge /metrics 9465, the simulated PLC 502. Working files: ./.demo/ (logs, certificates,
# broker and Prometheus data); the agent's store lives at its default
# /var/lib/edge-agent/store. The broker runs the shipped config
# (configs/mosquitto/: TLS and ACL); the demo makes a CA and certificates
# with scripts/fleet-certs.sh and puts the agent's and the bridge's where
# their defaults look: /etc/edge-agent/tls and /etc/fleet-bridge/tls.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=0
if [[ "${1:-}" == "--for" ]]; then duration="${2:?--for needs seconds}"; fi

say() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[demo] error:\033[0m %s\n' "$*" >&2; exit 1; }

scripts/setup.sh --demo
say "building release binaries"
cargo build --release --locked --bins -p edge-agent -p fleet-bridge -p e2e

for port in 502 8883 8884 8885 9090 9464 9465; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port on 127.0.0.1 is in use (a packaged mosquitto/prometheus service? stop it first: systemctl stop mosquitto prometheus)"
  fi
done

work="$PWD/.demo"
mkdir -p "$work/mosquitto" "$work/prometheus"

# Certificates: the device id is the agent's default (from the host name).
device=$( (target/release/edge-agent check-config 2>/dev/null || true) | sed -n "s/^device_id = //p")
[[ -n "$device" ]] || die "edge-agent check-config printed no device_id"
pki="$work/pki"
scripts/fleet-certs.sh "$pki" ca
scripts/fleet-certs.sh "$pki" server localhost
scripts/fleet-certs.sh "$pki" device "$device"
scripts/fleet-certs.sh "$pki" bridge
cp configs/mosquitto/acl configs/mosquitto/acl-central "$pki/"
touch "$pki/passwd"
chown -R mosquitto: "$work/mosquitto" "$pki" 2>/dev/null || true
install_tls() { # dir cert key name
  if [[ -e "$1/ca.crt" && ! -e "$1/.made-by-edge-demo" ]]; then
    die "$1 holds TLS files not made by this demo; move them away or run the agent and bridge with a config"
  fi
  mkdir -p "$1"
  cp "$pki/ca.crt" "$1/ca.crt"; cp "$2" "$1/$4.crt"; cp "$3" "$1/$4.key"
  chmod 600 "$1/$4.key"; touch "$1/.made-by-edge-demo"
}
install_tls /etc/edge-agent/tls "$pki/devices/$device.crt" "$pki/devices/$device.key" device
install_tls /etc/fleet-bridge/tls "$pki/bridge.crt" "$pki/bridge.key" bridge
pids=()
cleanup() {
  say "stopping"
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.2; done
  die "$2 did not start listening on port $1; see $work/$2.log"
}

{ printf 'persistence_location %s/mosquitto/\n' "$work"
  sed -e "s#/etc/mosquitto/edge/#$pki/#" -e 's/^listener \(888[345]\)$/listener \1 127.0.0.1/' configs/mosquitto/mosquitto.conf
} > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 & pids+=($!)
wait_port 8883 mosquitto

prometheus --config.file=configs/prometheus.yml --storage.tsdb.path="$work/prometheus" \
  --web.listen-address=127.0.0.1:9090 --web.enable-remote-write-receiver > "$work/prometheus.log" 2>&1 & pids+=($!)
wait_port 9090 prometheus

target/release/fleet-bridge > "$work/fleet-bridge.log" 2>&1 & pids+=($!)
wait_port 9465 fleet-bridge
# The pump's PLC and HMI; the agent's config is the shipped tag map.
mkdir -p /run/pump-sim
target/release/pump_sim --port 502 --hz 1 --rtu /run/pump-sim/ttyPLC --log "$work/pump.log" \
  > "$work/pump_sim.log" 2>&1 & pids+=($!)
wait_port 502 pump_sim
cp configs/tags/pump.toml "$work/agent.toml"
target/release/edge-agent --config "$work/agent.toml" > "$work/edge-agent.log" 2>&1 & pids+=($!)
wait_port 9464 edge-agent

cat >&2 <<MSG

  edge-agent is counting every TCP connection on this machine (10 s windows).
  Make some, e.g.:   for i in \$(seq 20); do curl -s -o /dev/null http://127.0.0.1:9090/; done

  A simulated pump PLC is polled once a second over Modbus/TCP and RTU; the
  agent captures its 26 tags from the wire (configs/tags/pump.toml).

  Prometheus (what arrived, with the device's timestamps):
    http://127.0.0.1:9090/graph?g0.expr=edge_tcp_connections_opened_total&g0.tab=0&g0.range_input=15m
    http://127.0.0.1:9090/graph?g0.expr=edge_process_value%7Btag%3D%22discharge_pressure%22%7D&g0.tab=0&g0.range_input=15m
  Agent's own metrics (probe, store, uplink):   curl -s http://127.0.0.1:9464/metrics
  Bridge's metrics:                             curl -s http://127.0.0.1:9465/metrics
  Logs: $work/*.log
MSG

if [[ "$duration" -gt 0 ]]; then
  for i in $(seq 20); do curl -s -o /dev/null http://127.0.0.1:9090/ || true; done
  sleep "$duration"
  say "series in Prometheus:"
  curl -s 'http://127.0.0.1:9090/api/v1/query?query=edge_tcp_connections_opened_total' | tr '{' '\n' | grep -o '"device".*' >&2 || true
  curl -s 'http://127.0.0.1:9090/api/v1/query?query=count(edge_tcp_connections_opened_total)' | grep -q '"result":\[{' \
    || die "no TCP counters arrived in Prometheus; see $work/*.log"
  say "ok: TCP counters arrived in Prometheus"
  curl -s 'http://127.0.0.1:9090/api/v1/query?query=count(count%20by%20(tag)(edge_process_value))' | grep -o '"value":\[[^]]*\]' >&2 || true
  curl -s 'http://127.0.0.1:9090/api/v1/query?query=count(edge_process_value)' | grep -q '"result":\[{' \
    || die "no process values arrived in Prometheus; see $work/*.log"
  say "ok: the pump's process values arrived in Prometheus"
else
  say "running; Ctrl-C to stop"
  wait -n "${pids[@]}" || true
  die "a component exited; see $work/*.log"
fi
