#!/usr/bin/env bash
# Runs a script on another kernel: the distribution's packaged one (Debian
# 12's 6.1, Ubuntu's), booted under QEMU with this host's file system as
# its root, read-only beneath a throwaway overlay, and a fresh /run. The
# tests use it for what this machine's kernel cannot show: kernels before
# a feature childflow uses, and kernel parameters (ipv6.disable=1).
#
#   hack/kernel-vm.sh fetch [PACKAGE]       download and unpack the kernel
#                                           (the distribution's, or PACKAGE's)
#   hack/kernel-vm.sh [-a ARGS] run SCRIPT  boot it with kernel ARGS, run
#                                           SCRIPT (a path on this host) as
#                                           root; its output and exit status
#
# QEMU emulates the CPU (TCG): these machines are guests whose /dev/kvm
# boots no stock kernel. Needs root (the root is shared through 9p).
set -euo pipefail
cache=${CHILDFLOW_VM_CACHE:-/var/cache/childflow-vm}

fetch() {
	local meta img=${1:-} ver pkgs tmp
	if [ -z "$img" ]; then
		meta=linux-image-amd64
		apt-cache show "$meta" >/dev/null 2>&1 || meta=linux-image-generic # Ubuntu
		img=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
		[ -n "$img" ] || { echo "kernel-vm: no kernel package behind $meta" >&2; exit 1; }
	fi
	ver=${img#linux-image-}
	[ -e "$cache/$ver/ready" ] && { ln -sfn "$ver" "$cache/current"; return; }
	pkgs=("$img")
	apt-cache show "linux-modules-$ver" >/dev/null 2>&1 && pkgs+=("linux-modules-$ver") # Ubuntu's modules
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' RETURN
	chmod 777 "$tmp" # apt downloads as _apt
	(cd "$tmp" && apt-get download -qq "${pkgs[@]}" >/dev/null)
	rm -rf "${cache:?}/$ver"
	mkdir -p "$cache/$ver"
	for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$cache/$ver"; done
	depmod -b "$(moddir_base "$cache/$ver")" "$ver"
	touch "$cache/$ver/ready"
	ln -sfn "$ver" "$cache/current"
}

# moddir_base is the directory whose lib/modules holds the kernel's
# modules: the unpacked root, or its usr (merged /usr packages).
moddir_base() {
	if [ -d "$1/lib/modules" ]; then echo "$1"; else echo "$1/usr"; fi
}

run() {
	local script=$1 root ver base work initrd
	root=$(readlink -f "$cache/current" 2>/dev/null) && [ -e "$root/ready" ] ||
		{ echo "kernel-vm: no kernel in $cache: run $0 fetch (hack/install-deps.sh does)" >&2; exit 1; }
	ver=$(basename "$root")
	base=$(moddir_base "$root")
	work=$(mktemp -d /tmp/kernel-vm.XXXXXX)
	trap 'rm -rf "$work"' EXIT
	initrd=$work/initrd
	mkdir -p "$initrd"/{bin,dev,proc,sys,lower,upper,newroot,mods} "$work/out"
	cp "$(command -v busybox)" "$initrd/bin/busybox"
	# The modules the boot needs, in load order (a built-in one is none).
	for m in virtio_pci 9pnet_virtio 9p overlay; do
		modprobe -d "$base" -S "$ver" --show-depends "$m"
	done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' | while read -r ko; do
		name=$(basename "$ko")
		name=${name%.xz} name=${name%.zst}
		case $ko in
		*.xz) xz -dc "$ko" >"$initrd/mods/$name" ;;
		*.zst) zstd -qdc "$ko" >"$initrd/mods/$name" ;;
		*) cp "$ko" "$initrd/mods/$name" ;;
		esac
		echo "$name" >>"$initrd/mods/order"
	done
	touch "$initrd/mods/order"
	cat >"$initrd/init" <<-EOF
		#!/bin/busybox sh
		/bin/busybox --install -s /bin
		mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
		for m in \$(cat /mods/order); do insmod /mods/\$m; done
		mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower
		mount -t tmpfs tmpfs /upper; mkdir /upper/u /upper/w
		mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot
		mkdir -p /newroot/vm /newroot/usr/lib/modules
		mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot/vm
		mount --bind /lower$base/lib/modules /newroot/usr/lib/modules
		mount -t tmpfs -o mode=755 tmpfs /newroot/run
		mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp # an overlay's upper layer may not be on one
		umount /proc /sys; mount --move /dev /newroot/dev
		mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys
		exec switch_root /newroot /bin/sh /vm/init
	EOF
	chmod +x "$initrd/init"
	# Inside: what a booted host has (cgroups, /dev/pts, module loading,
	# /dev/net/tun as udev makes it), then the script.
	cat >"$work/out/init" <<-EOF
		mount -t cgroup2 cgroup2 /sys/fs/cgroup
		# QEMU's multi-threaded emulation can run a stale translation of
		# kernel text that another vCPU is patching (a static key), and the
		# kernel then oopses on an int3 it no longer expects: 6.12 did, in
		# the page allocator, when containers' cgroups switched cpusets on
		# and off. A cpuset held from boot keeps that key on.
		echo +cpuset >/sys/fs/cgroup/cgroup.subtree_control; mkdir /sys/fs/cgroup/kernel-vm
		mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
		ln -s /proc/self/fd /dev/fd; ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
		echo /usr/sbin/modprobe >/proc/sys/kernel/modprobe
		modprobe tun; chmod 666 /dev/net/tun
		ulimit -Hn 524288 # systemd's hard limit for services and sessions
		ip link set lo up
		hostname kernel-vm
		export PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
		cd "$PWD"
		/bin/sh "$(readlink -f "$script")" >/vm/log 2>&1
		echo \$? >/vm/status
		sync; echo o >/proc/sysrq-trigger; sleep 10
	EOF
	(cd "$initrd" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$work/initrd.gz"
	# One NIC, whose user network reaches nothing (restrict=on; QEMU's
	# default one would reach what the host reaches): a test moves it
	# into a sandbox, as the host-device plugin moves a node's.
	# One vCPU unless asked for more: with two, QEMU's emulation once left
	# both spinning in the kernel for minutes under runc (soft lockups),
	# the other vCPU's work never seen; one has no other to wait for.
	timeout "${CHILDFLOW_VM_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg,thread=multi -smp "${CHILDFLOW_VM_CPUS:-1}" -m 3072 \
		-nographic -no-reboot -kernel "$root/boot/vmlinuz-$ver" -initrd "$work/initrd.gz" \
		-append "console=ttyS0 quiet panic=-1 ${append:-}" \
		-virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
		-virtfs "local,path=$work/out,mount_tag=out,security_model=passthrough" \
		-nic user,restrict=on,model=virtio-net-pci \
		</dev/null >"$work/console" 2>&1 || true
	cat "$work/out/log" 2>/dev/null || true
	if [ ! -s "$work/out/status" ]; then
		echo "kernel-vm: the script did not finish; the console's end:" >&2
		tail -n 100 "$work/console" | tr -d '\r' >&2
		exit 1
	fi
	exit "$(cat "$work/out/status")"
}

append=
while getopts a: opt; do
	case $opt in
	a) append=$OPTARG ;;
	*) exit 2 ;;
	esac
done
shift $((OPTIND - 1))
case ${1:-} in
fetch) fetch "${2:-}" ;;
run) [ $# = 2 ] || { echo "usage: $0 [-a KERNEL-ARGS] run SCRIPT" >&2; exit 2; }; run "$2" ;;
*) echo "usage: $0 fetch [PACKAGE] | [-a KERNEL-ARGS] run SCRIPT" >&2; exit 2 ;;
esac
