#!/bin/sh
# pysandbox initramfs /init (busybox sh). Loads the boot modules, mounts the read-only erofs
# root from the virtio-pmem device with DAX (docs/root-device.md) and hands PID 1 to the
# agent. Every failure prints one line starting with "pysandbox-init: error:" and powers off,
# so the host sees QEMU exit.
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

# The root's nvdimm regions read-only before nd_pmem binds them: /dev/pmem0 is then a
# read-only disk, so a write to it fails (EPERM) instead of storing into the host's read-only
# mapping of the image (which hung the writer). virtio_pmem registers its region
# asynchronously: wait for it.
pmem_readonly() {
    n=0
    until [ -e /sys/bus/nd/devices/region0/read_only ]; do
        n=$((n + 1))
        [ "$n" -le 1000 ] || die "the virtio-pmem region did not appear"
        usleep 5000
    done
    for ro in /sys/bus/nd/devices/region*/read_only; do
        echo 1 > "$ro" || die "cannot make $ro read-only"
    done
}

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
                case "$mod" in */nd_pmem.ko) pmem_readonly ;; esac
                insmod "/lib/modules/@KVER@/$mod" || die "cannot load module $mod"
            done
            ;;
    esac
done <<DEVICES
@DEVICE_MODULES@
DEVICES

root=/dev/pmem0
n=0
while [ ! -b "$root" ]; do
    n=$((n + 1))
    [ "$n" -le 1000 ] || die "root device $root did not appear (is the virtio-pmem device attached?)"
    usleep 5000
done
read -r ro < /sys/block/pmem0/ro && [ "$ro" = 1 ] || die "root device $root is not read-only"
mount -t erofs -o ro,dax=always "$root" /newroot || die "cannot mount $root (erofs, dax) on /newroot"
[ -x /newroot/usr/bin/python3.11 ] || die "/usr/bin/python3.11 missing in the root image"
[ -f /newroot/usr/lib/pysandbox/agent/__main__.py ] || die "agent package missing in the root image"
[ -f /newroot/usr/lib/pysandbox/agent_launcher.py ] || die "agent launcher missing in the root image"
for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs" || die "cannot move /$fs into the new root"
done
exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=/usr/lib/pysandbox:/usr/lib/pysandbox/site \
    switch_root /newroot @AGENT_ARGV@
