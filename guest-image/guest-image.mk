# Guest image targets, included by the top-level Makefile (which defines PY, VENV and `proto`).
#
#   make guest-image   kernel + initramfs + erofs root + manifest.json in $(GUEST_IMAGE_DIR);
#                      a no-op when manifest.json's inputs hash matches (build.py decides)
#   make floor-image   $(GUEST_IMAGE_DIR)/floor-initramfs.cpio (busybox-only benchmark floor)
#                      and floor-net-initramfs.cpio (the networking floor, with the NIC
#                      drivers); built together with the guest image, whose kernel they boot
#
# GUEST_IMAGE_DIR      where the image goes             (default /var/lib/pysandbox/guest)
# GUEST_IMAGE_CACHE    downloaded .debs and wheels      (default /var/cache/pysandbox)
# GUEST_KERNEL_FLAVOUR kernel package linux-image-<flavour> (default cloud-amd64; or amd64)
# GUEST_IMAGE_FLAGS    extra build.py flags, e.g. --force
GUEST_IMAGE_DIR ?= /var/lib/pysandbox/guest
GUEST_IMAGE_CACHE ?= /var/cache/pysandbox
GUEST_KERNEL_FLAVOUR ?= cloud-amd64
GUEST_IMAGE_FLAGS ?=

.PHONY: guest-image floor-image

guest-image: proto
	$(PY) guest-image/build.py --out '$(GUEST_IMAGE_DIR)' --cache '$(GUEST_IMAGE_CACHE)' \
		--kernel-flavour '$(GUEST_KERNEL_FLAVOUR)' $(GUEST_IMAGE_FLAGS)

floor-image: guest-image
	@for f in floor-initramfs.cpio floor-net-initramfs.cpio; do \
		test -f '$(GUEST_IMAGE_DIR)'/$$f || \
		{ echo "floor-image: $(GUEST_IMAGE_DIR)/$$f missing after build" >&2; exit 1; }; \
	done
