#!/bin/bash
# Build the end-to-end test guest: a kernel image and an initramfs.
#
#   tests/guest/build.sh [--out DIR] [--force]
#
# Kernel: Debian's linux-image-amd64 (/boot/vmlinuz-*; VUQ_KERNEL_VERSION picks one, default the
# newest with modules installed). We boot the uncompressed vmlinux extracted from the bzImage
# (the kernel has CONFIG_PVH=y, so QEMU's -kernel loads the ELF directly), which skips ~5 s of
# in-guest decompression under TCG; if extraction fails we fall back to the bzImage.
# Initramfs: busybox-static, the virtio modules (resolved from modules.dep, decompressed here
# because busybox insmod cannot load .ko.xz/.ko.zst), fio with every shared library ldd lists,
# and tests/guest/init. Uncompressed cpio (newc): the kernel unpacks it with memcpy, while gunzip
# of the ~80 MiB of fio libraries costs seconds under TCG. VUQ_GUEST_INITRD_GZIP=1 gzips it.
#
# Output is cached in DIR (default: <repo>/target/guest) under a key made of the kernel version
# and the hash of this script and init; a second run with the same inputs does nothing, a build
# with new inputs removes the older builds. The last
# two lines on stdout are always:
#   KERNEL=<path>
#   INITRD=<path>
# Nothing is downloaded.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out_root="$repo/target/guest"
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out_root=$2; shift 2 ;;
        --force) force=1; shift ;;
        *) echo "usage: $0 [--out DIR] [--force]" >&2; exit 2 ;;
    esac
done

die() { echo "build.sh: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

# Pick the kernel.
if [ -n "${VUQ_KERNEL_VERSION:-}" ]; then
    kver=$VUQ_KERNEL_VERSION
else
    kver=
    for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V -r); do
        if [ -f "/lib/modules/$k/modules.dep" ]; then kver=$k; break; fi
    done
    [ -n "$kver" ] || die "no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep (apt-get install linux-image-amd64)"
fi
bzimage=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver
[ -r "$bzimage" ] || die "cannot read $bzimage"
[ -f "$moddir/modules.dep" ] || die "no $moddir/modules.dep"

busybox=$(command -v busybox || true)
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked; install busybox-static"
fi
fio=$(command -v fio || true)
[ -n "$fio" ] || die "fio not found (apt-get install fio)"
for tool in cpio ldd sha256sum flock; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

key_input=$(cat "$here/build.sh" "$here/init"; echo "$kver ${VUQ_GUEST_INITRD_GZIP:-0}"; sha256sum "$fio" "$busybox")
key=$(printf '%s' "$key_input" | sha256sum | cut -c1-16)
out="$out_root/$kver-$key"

if [ "$force" = 0 ] && [ -f "$out/done" ]; then
    cat "$out/done"
    exit 0
fi

# Tests running in parallel may all call this script: one builds, the others wait for it.
mkdir -p "$out_root"
exec 9>"$out_root/.lock"
flock 9
if [ "$force" = 0 ] && [ -f "$out/done" ]; then
    cat "$out/done"
    exit 0
fi
rm -rf "$out"
tmp=$(mktemp -d "$out_root/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- Kernel: extract vmlinux from the bzImage, as the kernel tree's scripts/extract-vmlinux does:
# find each compressor's magic, decompress from there, keep the first result that is an ELF file.
try_decompress() { # magic-regex name command...
    local magic=$1 name=$2
    shift 2
    local off
    for off in $(LC_ALL=C grep -aboP "$magic" "$bzimage" | cut -d: -f1); do
        tail -c +$((off + 1)) "$bzimage" | "$@" >"$tmp/vmlinux" 2>/dev/null || true
        if [ "$(head -c 4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
            log "extracted vmlinux ($name at offset $off)"
            return 0
        fi
    done
    rm -f "$tmp/vmlinux"
    return 1
}
kernel=bzImage
if { command -v xz >/dev/null && try_decompress '\xfd7zXZ\x00' xz xz -dc; } ||
    { command -v zstd >/dev/null && try_decompress '\x28\xb5\x2f\xfd' zstd zstd -dc; } ||
    try_decompress '\x1f\x8b\x08' gzip gzip -dc; then
    kernel=vmlinux
else
    log "could not extract vmlinux from $bzimage; booting the bzImage (slower)"
    cp "$bzimage" "$tmp/bzImage"
fi

# --- Initramfs.
root=$tmp/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules,usr/bin}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp "$here/init" "$root/init"
chmod 755 "$root/init"

# Modules in load order: every module listed with its dependencies in modules.dep, deepest first.
declare -A loaded=()
modlist=()
add_module() { # path relative to $moddir
    local rel=$1 line
    [ -n "${loaded[$rel]:-}" ] && return 0
    loaded[$rel]=1
    line=$(grep -E "^${rel//./\\.}:" "$moddir/modules.dep" || true)
    [ -n "$line" ] || die "$rel not in modules.dep"
    # modules.dep lists dependencies so that the last one must be loaded first.
    local deps
    read -r -a deps <<<"${line#*:}"
    local i
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        add_module "${deps[$i]}"
    done
    modlist+=("$rel")
}
find_module() { # module name -> path relative to $moddir, or nothing if built in
    local name=$1
    grep -oE "^[^:]*/${name}\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" | head -1 | tr -d :
}
for name in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    rel=$(find_module "$name")
    if [ -z "$rel" ]; then
        if grep -qE "/${name}\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
            continue
        fi
        die "module $name neither in modules.dep nor modules.builtin of $kver"
    fi
    add_module "$rel"
done
: >"$root/lib/modules/load-order"
for rel in "${modlist[@]}"; do
    base=$(basename "$rel")
    case "$base" in
        *.ko.xz) xz -dc "$moddir/$rel" >"$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" >"$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz) gzip -dc "$moddir/$rel" >"$root/lib/modules/${base%.gz}"; base=${base%.gz} ;;
        *) cp "$moddir/$rel" "$root/lib/modules/$base" ;;
    esac
    echo "$base" >>"$root/lib/modules/load-order"
done
log "modules: $(tr '\n' ' ' <"$root/lib/modules/load-order")"

# fio and every library it needs (the loader included), at the paths ldd resolved them to.
copy_with_parents() {
    local src=$1
    mkdir -p "$root$(dirname "$src")"
    cp -L "$src" "$root$src"
}
copy_with_parents "$fio"
nlibs=0
while read -r lib; do
    copy_with_parents "$lib"
    nlibs=$((nlibs + 1))
done < <(ldd "$fio" | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+ \(/ { print $1 }' | sort -u)
# No ld.so.cache in the guest: init exports LD_LIBRARY_PATH from this list of library directories.
mkdir -p "$root/etc"
(cd "$root" && find . -name '*.so*' -type f -printf '%h\n' | sed 's|^\.||' | sort -u) >"$root/etc/library-path"
log "fio: $fio with $nlibs libraries"

# newc archive; root-owned files so the guest sees sane permissions.
if [ "${VUQ_GUEST_INITRD_GZIP:-0}" = 1 ]; then
    initrd=initramfs.cpio.gz
    (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1) >"$tmp/$initrd"
else
    initrd=initramfs.cpio
    (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) >"$tmp/$initrd"
fi
rm -rf "$root"
log "initramfs: $(du -h "$tmp/$initrd" | cut -f1)"

printf 'KERNEL=%s\nINITRD=%s\n' "$out/$kernel" "$out/$initrd" >"$tmp/done"
mv "$tmp" "$out"
trap - EXIT
# Each is ~150 MiB: drop guests built from older inputs.
for d in "$out_root"/*/; do
    d=${d%/}
    [ "$d" = "$out" ] || [ ! -f "$d/done" ] || rm -rf "$d"
done
cat "$out/done"
