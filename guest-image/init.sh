#!/bin/sh
# pysandbox initramfs /init (busybox sh). Loads the boot modules, mounts the read-only erofs
# root from the first virtio disk and hands PID 1 to the agent. Every failure prints one line
# starting with "pysandbox-init: error:" and powers off, so the host sees QEMU exit.
# Kernel parameter pysandbox.root=DEV overrides the root device (default /dev/vda).
# @KVER@, @MODULES@, @DEVICE_MODULES@ and @AGENT_ARGV@ are filled in by guest-image/build.py.
die() {
    echo "pysandbox-init: error: $*"
    poweroff -f
    sleep 10
    exit 1
}
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || die "cannot mount devtmpfs on /dev"
mount -t proc -o nosuid,nodev,noexec proc /proc || die "cannot mount proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || die "cannot mount sysfs"

for mod in @MODULES@; do
    insmod "/lib/modules/@KVER@/$mod" || die "cannot load module $mod"
done
# Drivers of optional devices, one "<virtio device id> <modules...>" line each: loaded only
# when such a device exists (virtio_pci, loaded above, has registered every virtio device).
present=" "
for dev in /sys/bus/virtio/devices/*/device; do
    [ -r "$dev" ] && read -r id < "$dev" && present="$present$id "
done
while read -r id mods; do
    [ -n "$id" ] || continue
    case "$present" in
        *" $id "*)
            for mod in $mods; do
                insmod "/lib/modules/@KVER@/$mod" || die "cannot load module $mod"
            done
            ;;
    esac
done <<DEVICES
@DEVICE_MODULES@
DEVICES

root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pysandbox.root=*) root="${arg#pysandbox.root=}" ;;
    esac
done
n=0
while [ ! -b "$root" ]; do
    n=$((n + 1))
    [ "$n" -le 1000 ] || die "root device $root did not appear (is the virtio-blk disk attached?)"
    usleep 5000
done
mount -t erofs -o ro "$root" /newroot || die "cannot mount $root (erofs) on /newroot"
[ -x /newroot/usr/bin/python3.11 ] || die "/usr/bin/python3.11 missing in the root image"
[ -f /newroot/usr/lib/pysandbox/agent/__main__.py ] || die "agent package missing in the root image"
[ -f /newroot/usr/lib/pysandbox/agent_launcher.py ] || die "agent launcher missing in the root image"
for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs" || die "cannot move /$fs into the new root"
done
exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=/usr/lib/pysandbox:/usr/lib/pysandbox/site \
    switch_root /newroot @AGENT_ARGV@
