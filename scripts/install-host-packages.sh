#!/usr/bin/env bash
# Installs the Debian packages pysandbox needs on the host (idempotent; needs root).
# The list lives in guest-image/host-packages.txt (image build) and below (runtime, tests).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
runtime_pkgs=(qemu-system-x86 qemu-system-common python3 python3-venv python3-dev gcc make
              busybox-static iproute2 procps podman containerd
              iptables                                 # kubectl port-forward (pod netns rule)
              skopeo)                                  # `pysandbox pull`: the registry client
# tests of `pysandbox pull`: a real registry on loopback (htpasswd auth, TLS via openssl);
# the file-semantics test: a static checker (gcc -static needs libc.a) compared with runc
test_pkgs=(docker-registry apache2-utils openssl libc6-dev runc)
mapfile -t image_pkgs < <(grep -v '^\s*#' "$here/guest-image/host-packages.txt" 2>/dev/null | grep -v '^\s*$' || true)
wanted=("${runtime_pkgs[@]}" "${test_pkgs[@]}" "${image_pkgs[@]}")
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-host-packages: missing ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "install-host-packages: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
