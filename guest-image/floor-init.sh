#!/bin/sh
# Benchmark floor: the least a guest can do. Kernel boot + busybox, marker, power off.
# Network mode (bench/network.py; floor-net-initramfs.cpio, which adds the NIC drivers and
# the nc/dd/wc/ip applets): kernel parameters floor_net=IP/PREFIX and floor_gw=IP (no dot in
# their names, so the kernel hands them to /init as environment variables).
if [ -z "$floor_net" ]; then
    echo PYSANDBOX-FLOOR-READY
    poweroff -f
fi
die() {
    echo "floor: error: $*"
    poweroff -f
}
mount -t devtmpfs devtmpfs /dev || die "cannot mount devtmpfs"
mount -t proc proc /proc || die "cannot mount proc"
mount -t sysfs sysfs /sys || die "cannot mount sysfs"
# Drivers, dependencies first (the build numbers the files in load order).
for mod in /floor-net/*.ko; do
    [ -e "$mod" ] || die "no NIC drivers in this initramfs (boot floor-net-initramfs.cpio)"
    insmod "$mod" || die "cannot load $mod"
done
n=0
while [ ! -e /sys/class/net/eth0 ]; do
    n=$((n + 1))
    [ "$n" -le 1000 ] || die "eth0 did not appear (is a virtio-net NIC attached?)"
    usleep 5000
done
ip link set lo up
ip addr add "$floor_net" dev eth0 || die "cannot add $floor_net to eth0"
ip link set eth0 up || die "cannot bring eth0 up"
[ -z "$floor_gw" ] || ip route add default via "$floor_gw" || die "cannot route via $floor_gw"
echo PYSANDBOX-FLOOR-NET-READY
# Control: each connection to port 5000 is one busybox sh reading a script (the host sends
# the same programs the pod side runs in a container).
while true; do
    nc -l -p 5000 -e sh
done
