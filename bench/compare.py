"""Interleaved pod boots of several guest images / kernel command lines (A/B under noise).

    .venv/bin/python bench/compare.py --runs 7 before=/tmp/img-old after=/var/lib/pysandbox/guest \
        after+noirq=/var/lib/pysandbox/guest:acpi=noirq

Each ``NAME=IMAGE_DIR[:EXTRA KERNEL ARGS]`` is booted once per round, round after round, with
``sandbox.pod.lifecycle.Pod.boot`` (the image through ``$PYSANDBOX_GUEST_IMAGE``, the extra
arguments appended to ``sandbox.pod.lifecycle.kernel_cmdline()`` in this process only), so that
host noise spreads
over all variants alike. Prints median/min/max of spawn -> Health, the ``Pod.boot`` wall time
and the guest uptime at Health; ``--json FILE`` also writes them. Probes as in ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

from sandbox.pod import lifecycle as pod_module

KEYS = ("spawn_to_health", "boot_wall", "guest_uptime_at_health")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("variants", nargs="+", metavar="NAME=IMAGE_DIR[:EXTRA_CMDLINE]")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    variants: list[tuple[str, str, str]] = []
    for item in args.variants:
        name, sep, rest = item.partition("=")
        image, _, extra = rest.partition(":")
        if not sep or not name or not image:
            parser.error(f"bad variant {item!r}: expected NAME=IMAGE_DIR[:EXTRA_CMDLINE]")
        variants.append((name, image, extra))

    base_cmdline = pod_module.kernel_cmdline
    bench.install_probes()
    root = Path(tempfile.mkdtemp(prefix="psb-cmp-", dir="/tmp"))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    try:
        for i in range(args.runs):
            for n, (name, image, extra) in enumerate(variants):
                os.environ["PYSANDBOX_GUEST_IMAGE"] = image
                cmdline = f"{base_cmdline()} {extra}".strip()
                pod_module.kernel_cmdline = lambda accel="tcg", cpus=1, c=cmdline: c  # type: ignore[misc]
                times, _ = bench.run_pod(root, f"cmp-{os.getpid()}-{i}-{n}", 512, args.timeout)
                results[name].append(times)
                print(f"round {i + 1} {name}: spawn->health {times['spawn_to_health']:.3f}s")
    finally:
        pod_module.kernel_cmdline = base_cmdline
        for pod in pod_module.Pod.list(root):
            pod.destroy()
        shutil.rmtree(root, ignore_errors=True)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    print(f"\n{'variant':<16} {'seconds':<24} {'median':>7} {'min':>7} {'max':>7}")
    for name, runs in results.items():
        summary[name] = {}
        for key in KEYS:
            values = [t[key] for t in runs if key in t]
            if not values:
                continue
            stats = bench.summary(values)
            summary[name][key] = stats
            print(
                f"{name:<16} {key:<24} {stats['median']:7.3f} {stats['min']:7.3f} "
                f"{stats['max']:7.3f}"
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"runs": args.runs, "variants": variants, "summary": summary}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
