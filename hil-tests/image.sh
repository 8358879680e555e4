#!/usr/bin/env bash
# Builds the emulated aarch64 board's boot files from Debian's arm64 kernel
# package, Debian's static BusyBox, the cross-built agent, and the same
# rootfs overlay a Buildroot image gets (buildroot/board/edge/rootfs-overlay):
#
#   hil-tests/image.sh OUT AGENT [PROVISION]
#
#   OUT        gets vmlinuz, initrd.img (gzip'd cpio) and kernel.txt
#   AGENT      the aarch64 edge-agent (static: cross/build.sh aarch64-unknown-linux-musl)
#   PROVISION  a directory copied over the root last: the device's identity
#              (etc/hostname, etc/edge-agent/tls/*), etc/hosts, ...
#
# Checks the kernel's config against buildroot/board/edge/linux-probes.fragment
# first: every option must be built in, or a module the board loads.
# The .debs are downloaded once into target/hil/debs (needs the arm64
# architecture in dpkg: scripts/setup.sh adds it).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: image.sh OUT AGENT [PROVISION]}
agent=${2:?usage: image.sh OUT AGENT [PROVISION]}
provision=${3:-}
die() { echo "image.sh: $*" >&2; exit 1; }

[[ -x "$agent" ]] || die "no agent binary at $agent (cross/build.sh aarch64-unknown-linux-musl builds it)"
file -b "$agent" | grep -q 'ARM aarch64' || die "$agent is not an aarch64 binary: $(file -b "$agent")"

debs="$repo/target/hil/debs"
mkdir -p "$debs" "$out"
fetch() { # package -> path of its .deb in $debs
  local f
  f=$(find "$debs" -maxdepth 1 -name "${1%%:*}_*_arm64.deb" | sort | tail -1)
  if [[ -z "$f" ]]; then
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$1" >&2) || die "cannot download $1 (is arm64 in 'dpkg --print-foreign-architectures'? scripts/setup.sh adds it)"
    f=$(find "$debs" -maxdepth 1 -name "${1%%:*}_*_arm64.deb" | sort | tail -1)
  fi
  echo "$f"
}
kpkg=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { sub(/:arm64$/, "", $2); print $2; exit }')
[[ -n "$kpkg" ]] || die "apt knows no linux-image-arm64:arm64 (run scripts/setup.sh: it adds the arm64 architecture and updates apt)"
kdeb=$(fetch "$kpkg:arm64")
bdeb=$(fetch busybox-static:arm64)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bdeb" "$work/busybox"
kver=$(basename "$(find "$work/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d)")
kconfig="$work/kernel/boot/config-$kver"
moddir="$work/kernel/lib/modules/$kver"

# Modules the board loads, dependencies first.
declare -A seen=()
order=()
add_module() {
  local name=$1 path dep
  [[ -n "${seen[$name]:-}" ]] && return 0
  seen[$name]=1
  path=$(find "$moddir" -name "$name.ko" -o -name "${name//_/-}.ko" | head -1)
  [[ -n "$path" ]] || die "module $name is not in $kpkg"
  for dep in $(/sbin/modinfo -F depends "$path" | tr ',' ' '); do add_module "$dep"; done
  order+=("${path#"$moddir"/}")
}
for m in $(grep -v '^#' "$repo/hil-tests/image/modules"); do add_module "$m"; done

# The kernel against the probes' fragment. Options Debian builds as
# modules count when the board loads that module.
declare -A module_of=([CONFIG_INET_DIAG]=inet_diag [CONFIG_INET_TCP_DIAG]=tcp_diag)
missing=()
while IFS= read -r line; do
  [[ "$line" =~ ^(CONFIG_[A-Z0-9_]+)=y$ ]] || continue
  opt=${BASH_REMATCH[1]}
  grep -qx "$opt=y" "$kconfig" && continue
  if grep -qx "$opt=m" "$kconfig"; then
    mod=${module_of[$opt]:-}
    [[ -n "$mod" && -n "${seen[$mod]:-}" ]] && continue
    missing+=("$opt (a module in this kernel: list it in hil-tests/image/modules)")
  else
    missing+=("$opt")
  fi
done < "$repo/buildroot/board/edge/linux-probes.fragment"
((${#missing[@]} == 0)) || die "kernel $kver lacks what buildroot/board/edge/linux-probes.fragment asks for: ${missing[*]}"

# The root file system.
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,var,etc/hil,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in $(qemu-aarch64-static "$root/bin/busybox" --list); do
  [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
done
for m in "${order[@]}"; do
  install -D -m 0644 "$moddir/$m" "$root/lib/modules/$m"
done
printf '%s\n' "${order[@]}" > "$root/etc/hil/modules"
install -m 0755 "$agent" "$root/usr/bin/edge-agent"
cp -a "$repo/buildroot/board/edge/rootfs-overlay/." "$root/"
install -m 0755 "$repo/hil-tests/image/init" "$root/init"
echo edge-device > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n' > "$root/etc/hosts"
if [[ -n "$provision" ]]; then cp -a "$provision/." "$root/"; fi

(cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 > "$out/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$kpkg $(dpkg-deb -f "$kdeb" Version)" > "$out/kernel.txt"
echo "image.sh: $out: kernel $(cat "$out/kernel.txt"), initrd $(stat -c %s "$out/initrd.img") bytes, modules: ${order[*]}" >&2
