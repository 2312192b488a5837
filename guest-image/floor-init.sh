#!/bin/sh
# Benchmark floor: the least a guest can do. Kernel boot + busybox, marker, power off.
echo PYSANDBOX-FLOOR-READY
poweroff -f
