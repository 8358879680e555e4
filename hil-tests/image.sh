#!/usr/bin/env bash
# Builds an emulated board's boot files from Debian's kernel package,
# Debian's static BusyBox, the cross-built agent, and the same rootfs overlay
# a Buildroot image gets (buildroot/board/edge/rootfs-overlay):
#
#   hil-tests/image.sh OUT AGENT [PROVISION]        HIL_ARCH=arm64 (default) or riscv64
#
#   OUT        gets the kernel (kernel.img), initrd.img (gzip'd cpio) and kernel.txt
#   AGENT      the edge-agent for that architecture: static (musl), or dynamic
#              (glibc; its libraries come from Debian's cross libc packages)
#   PROVISION  a directory copied over the root last: the device's identity
#              (etc/hostname, etc/edge-agent/tls/*), etc/hosts, ...
#
# Checks the kernel's config against buildroot/board/edge/linux-probes.fragment
# first: every option must be built in, or a module the board loads.
# The .debs are downloaded once into target/hil/debs:
# - arm64 from Debian 12 with apt (needs arm64 in dpkg's architectures:
#   scripts/setup.sh adds it);
# - riscv64 from Debian 13 (riscv64 is an official architecture since 13),
#   verified: the release file's signature (gpgv, Debian's archive keyring),
#   the package index's SHA-256 from it, each .deb's SHA-256 from the index.
#
#   hil-tests/image.sh --fetch      only download (and verify) the .debs: the boot
#                                   test does this before it leaves the network
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
arch=${HIL_ARCH:-arm64}
die() { echo "image.sh: $*" >&2; exit 1; }
fetch_only=0
if [[ "${1:-}" == --fetch ]]; then
  fetch_only=1
else
  out=${1:?usage: image.sh OUT AGENT [PROVISION] | image.sh --fetch}
  agent=${2:?usage: image.sh OUT AGENT [PROVISION] | image.sh --fetch}
  provision=${3:-}
fi

case "$arch" in
  arm64) triple=aarch64-linux-gnu; elf='ARM aarch64'; qemu_user=qemu-aarch64-static ;;
  riscv64) triple=riscv64-linux-gnu; elf='RISC-V'; qemu_user=qemu-riscv64-static ;;
  *) die "HIL_ARCH=$arch: arm64 or riscv64" ;;
esac
if ((!fetch_only)); then
  [[ -x "$agent" ]] || die "no agent binary at $agent (cross/build.sh builds it)"
  file -b "$agent" | grep -q "$elf" || die "$agent is not a $arch binary: $(file -b "$agent")"
  mkdir -p "$out"
fi

debs="$repo/target/hil/debs"
mkdir -p "$debs"

# arm64: apt, package name -> path of its .deb.
apt_fetch() {
  local f
  f=$(find "$debs" -maxdepth 1 -name "${1%%:*}_*_$arch.deb" | sort | tail -1)
  if [[ -z "$f" ]]; then
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$1" >&2) \
      || die "cannot download $1 (is $arch in 'dpkg --print-foreign-architectures'? scripts/setup.sh adds it)"
    f=$(find "$debs" -maxdepth 1 -name "${1%%:*}_*_$arch.deb" | sort | tail -1)
  fi
  echo "$f"
}

# riscv64: Debian 13's archive, verified link by link.
mirror=http://deb.debian.org/debian
index="$debs/trixie-riscv64-Packages"
trixie_index() {
  # Kept a day: the archive drops superseded kernels from its pool.
  [[ -s "$index" && -n "$(find "$index" -mmin -1440)" ]] && return 0
  local rel="$debs/trixie-InRelease" sum
  curl -fsS -m 60 -o "$rel" "$mirror/dists/trixie/InRelease" || die "cannot download Debian 13's release file"
  gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg "$rel" 2>/dev/null \
    || die "$rel: bad signature (is debian-archive-keyring current?)"
  sum=$(awk '$3 == "main/binary-riscv64/Packages.xz" && length($1) == 64 { print $1; exit }' "$rel")
  curl -fsS -m 120 -o "$index.xz" "$mirror/dists/trixie/main/binary-riscv64/Packages.xz" || die "cannot download the riscv64 package index"
  echo "$sum  $index.xz" | sha256sum -c --quiet - || die "the riscv64 package index does not match the signed release file"
  xz -dc "$index.xz" > "$index"
}
trixie_field() { # package field
  awk -v p="$1" -v f="$2:" '$1 == "Package:" { on = ($2 == p) } on && $1 == f { $1 = ""; sub(/^ /, ""); print; exit }' "$index"
}
trixie_fetch() { # package -> path of its verified .deb
  local file sum f
  file=$(trixie_field "$1" Filename)
  sum=$(trixie_field "$1" SHA256)
  [[ -n "$file" && -n "$sum" ]] || die "package $1 is not in Debian 13's riscv64 index"
  f="$debs/$(basename "$file")"
  if [[ ! -s "$f" ]]; then
    curl -fsS -m 600 -o "$f.part" "$mirror/$file" || die "cannot download $mirror/$file"
    mv "$f.part" "$f"
  fi
  echo "$sum  $f" | sha256sum -c --quiet - || { rm -f "$f"; die "$f does not match its SHA-256 in the signed index"; }
  echo "$f"
}

if [[ $arch == arm64 ]]; then
  kpkg=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { sub(/:arm64$/, "", $2); print $2; exit }')
  [[ -n "$kpkg" ]] || die "apt knows no linux-image-arm64:arm64 (run scripts/setup.sh: it adds the arm64 architecture and updates apt)"
  kdeb=$(apt_fetch "$kpkg:arm64")
  bdeb=$(apt_fetch busybox-static:arm64)
else
  trixie_index
  kpkg=$(trixie_field linux-image-riscv64 Depends | sed -E 's/ .*//')
  [[ -n "$kpkg" ]] || die "no linux-image-riscv64 in Debian 13's index"
  kdeb=$(trixie_fetch "$kpkg")
  bdeb=$(trixie_fetch busybox-static)
fi

if ((fetch_only)); then
  echo "image.sh: $arch: $(basename "$kdeb") $(basename "$bdeb")" >&2
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bdeb" "$work/busybox"
modroot=$(find "$work/kernel" -maxdepth 3 -type d -path '*/lib/modules' | head -1)
kver=$(basename "$(find "$modroot" -mindepth 1 -maxdepth 1 -type d)")
kconfig="$work/kernel/boot/config-$kver"
moddir="$modroot/$kver"
kimage=$(find "$work/kernel/boot" -name "vmlinu[xz]-$kver" | head -1)

# Modules the board loads, dependencies first; built-in ones are skipped.
declare -A seen=()
order=()
add_module() {
  local name=$1 path dep
  [[ -n "${seen[$name]:-}" ]] && return 0
  seen[$name]=1
  if grep -qE "/(${name}|${name//_/-})\.ko$" "$moddir/modules.builtin" 2>/dev/null; then return 0; fi
  path=$(find "$moddir" -name "$name.ko" -o -name "$name.ko.xz" -o -name "${name//_/-}.ko" -o -name "${name//_/-}.ko.xz" | head -1)
  [[ -n "$path" ]] || die "module $name is not in $kpkg"
  for dep in $(/sbin/modinfo -F depends "$path" | tr ',' ' '); do add_module "$dep"; done
  order+=("${path#"$moddir"/}")
}
# Every board's, then this architecture's (modules.$arch).
for list in "$repo/hil-tests/image/modules" "$repo/hil-tests/image/modules.$arch"; do
  [[ -f "$list" ]] || continue
  for m in $(grep -v '^#' "$list"); do add_module "$m"; done
done

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
bb=$(find "$work/busybox" -type f -name busybox -perm -u+x | head -1)
[[ -n "$bb" ]] || die "no busybox binary in $bdeb"
cp "$bb" "$root/bin/busybox"
for applet in $("$qemu_user" "$root/bin/busybox" --list); do
  [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
done
loaded=()
for m in "${order[@]}"; do
  dest="$root/lib/modules/${m%.xz}"
  mkdir -p "$(dirname "$dest")"
  # BusyBox insmod takes plain modules: decompress here.
  if [[ $m == *.xz ]]; then xz -dc "$moddir/$m" > "$dest"; else cp "$moddir/$m" "$dest"; fi
  loaded+=("${m%.xz}")
done
printf '%s\n' "${loaded[@]}" > "$root/etc/hil/modules"
install -m 0755 "$agent" "$root/usr/bin/edge-agent"
# A dynamic (glibc) agent: its loader and libraries from Debian's cross libc.
interp=$(readelf -l "$agent" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
if [[ -n "$interp" ]]; then
  sysroot=/usr/$triple
  install -D -m 0755 "$sysroot/lib/$(basename "$interp")" "$root$interp"
  for lib in $(readelf -d "$agent" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
    [[ -e "$sysroot/lib/$lib" ]] || die "$lib (needed by $agent) is not in $sysroot/lib"
    install -D -m 0755 "$sysroot/lib/$lib" "$root/lib/$lib"
  done
fi
# The shipped anomaly model, where the Buildroot package installs it (the
# default detect.model).
for f in anomaly.card.json anomaly.tflite; do
  install -D -m 0644 "$repo/model/shipped/$f" "$root/usr/share/edge-agent/model/$f"
done
cp -a "$repo/buildroot/board/edge/rootfs-overlay/." "$root/"
install -m 0755 "$repo/hil-tests/image/init" "$root/init"
# The bus exercise, where the board has buses (arm64-buses.dtsi).
[[ $arch != arm64 ]] || install -m 0755 "$repo/hil-tests/image/buses.sh" "$root/etc/hil/buses.sh"
echo edge-device > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n' > "$root/etc/hosts"
if [[ -n "$provision" ]]; then cp -a "$provision/." "$root/"; fi

(cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 > "$out/initrd.img"
cp "$kimage" "$out/kernel.img"
echo "$kpkg $(dpkg-deb -f "$kdeb" Version)" > "$out/kernel.txt"
echo "image.sh: $out ($arch): kernel $(cat "$out/kernel.txt"), initrd $(stat -c %s "$out/initrd.img") bytes, modules: ${loaded[*]}" >&2
