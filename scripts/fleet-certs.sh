#!/usr/bin/env bash
# Certificates for a fleet: the broker's server certificate, one client
# certificate per device, and the bridges' client certificate. ECDSA P-256,
# PKCS#8 keys, X.509 v3 (rustls refuses v1 certificates).
#
#   scripts/fleet-certs.sh DIR ca                    fleet CA and bridge CA (once), and
#                                                    DIR/mqtt-clients-ca.crt: both, for a NATS
#                                                    node's MQTT listener (devices and operators)
#   scripts/fleet-certs.sh DIR server NAME [IP...]   DIR/server.{crt,key}, SANs NAME, localhost, IPs
#   scripts/fleet-certs.sh DIR device ID             DIR/devices/ID.{crt,key}, CN=ID
#   scripts/fleet-certs.sh DIR bridge                DIR/bridge.{crt,key}, CN=fleet-bridge
#   scripts/fleet-certs.sh DIR admin                 DIR/admin.{crt,key}, CN=fleet-admin (publishes models)
#   scripts/fleet-certs.sh DIR node NAME [IP...]     DIR/nodes/NAME.{crt,key}: a NATS cluster node
#                                                    (server and route client: SANs NAME, localhost, IPs)
#
# Two CAs on purpose (configs/mosquitto/mosquitto.conf): the fleet CA signs
# the server and the devices; the bridge CA signs only bridges. The bridge
# listener trusts only the bridge CA, so a device's certificate (whose CN the
# broker uses as its user name and client id) can never log in there. Device
# ids starting with "fleet-" are refused (the central identities' names,
# edge_wire::RESERVED_ID_PREFIX): no device certificate carries one.
# Existing files are kept: running a command twice changes nothing.
# FLEET_CERT_DAYS: how long what is made now is valid (default 3650 days);
# shorter-lived device certificates are renewed by rotation
# (docs/configuration.md, "Certificate rotation").
# Serial numbers are random (no -CAcreateserial: OpenSSL 3 then draws one),
# so certificates for many devices can be made at once.
set -euo pipefail

dir="${1:?usage: fleet-certs.sh DIR ca|server|node|device|bridge|admin ...}"
cmd="${2:?usage: fleet-certs.sh DIR ca|server|node|device|bridge|admin ...}"
shift 2
mkdir -p "$dir"
days=${FLEET_CERT_DAYS:-3650}

key() { [[ -f "$1" ]] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }

ca() { # name subject
  [[ -f "$dir/$1.crt" ]] && return 0
  key "$dir/$1.key"
  openssl req -x509 -new -key "$dir/$1.key" -subj "$2" -days "$days" -out "$dir/$1.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

sign() { # ca out cn ext
  [[ -f "$2.crt" ]] && return 0
  key "$2.key"
  local ext; ext=$(mktemp); printf '%s\n' "$4" > "$ext"
  openssl req -new -key "$2.key" -subj "/CN=$3" 2>/dev/null \
    | openssl x509 -req -CA "$dir/$1.crt" -CAkey "$dir/$1.key" -days "$days" \
        -extfile "$ext" -out "$2.crt" 2>/dev/null
  rm -f "$ext"
}

# The NATS nodes' MQTT listener (configs/nats/node.conf) serves devices
# (fleet CA) and operators (CN=fleet-admin, bridge CA) on one port, so it
# trusts both; users.conf gives each subject its rights, and no device
# certificate carries a "fleet-" name.
clients_bundle() {
  [[ -f "$dir/mqtt-clients-ca.crt" ]] || cat "$dir/ca.crt" "$dir/bridge-ca.crt" > "$dir/mqtt-clients-ca.crt"
}

client_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

case "$cmd" in
  ca)
    ca ca "/CN=edge fleet CA"
    ca bridge-ca "/CN=edge fleet bridge CA"
    clients_bundle
    ;;
  server)
    name="${1:?server needs a host name}"; shift
    san="DNS:$name,DNS:localhost,IP:127.0.0.1"
    for ip in "$@"; do san+=",IP:$ip"; done
    sign ca "$dir/server" "$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
    ;;
  node)
    # A node of the NATS cluster (configs/nats/node.conf) serves devices
    # and bridges, and its routes log in to the other nodes with the same
    # certificate: server and client use.
    name="${1:?node needs a host name}"; shift
    [[ "$name" =~ ^[A-Za-z0-9.-]{1,64}$ ]] || { echo "node name '$name': 1..64 of [A-Za-z0-9.-]" >&2; exit 2; }
    san="DNS:$name,DNS:localhost,IP:127.0.0.1"
    for ip in "$@"; do san+=",IP:$ip"; done
    mkdir -p "$dir/nodes"
    clients_bundle
    sign ca "$dir/nodes/$name" "$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san"
    ;;
  device)
    id="${1:?device needs an id}"
    [[ "$id" =~ ^[A-Za-z0-9._-]{1,64}$ ]] || { echo "device id '$id': 1..64 of [A-Za-z0-9._-]" >&2; exit 2; }
    shopt -s nocasematch
    [[ "$id" != fleet-* ]] || { echo "device id '$id' is reserved: ids starting with 'fleet-' name the central identities" >&2; exit 2; }
    shopt -u nocasematch
    mkdir -p "$dir/devices"
    sign ca "$dir/devices/$id" "$id" "$client_ext"
    ;;
  bridge)
    sign bridge-ca "$dir/bridge" fleet-bridge "$client_ext"
    ;;
  admin)
    sign bridge-ca "$dir/admin" fleet-admin "$client_ext"
    ;;
  *)
    echo "unknown command '$cmd' (ca, server, node, device, bridge, admin)" >&2; exit 2 ;;
esac
