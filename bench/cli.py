"""pysandbox CLI benchmark: verb start-up, runc-style create+start, and ``pysandbox run``.

Run from the repository root as root with the project venv (``make bench`` runs it after
bench/run.py)::

    .venv/bin/python bench/cli.py [--runs N] [--out DIR]

Three groups, every figure the median of ``--runs`` (default 5) runs, alternated with its
floor so that host noise hits both alike, reported as a ratio of medians:

* **verb start-up** (issue: ``state``/``kill``/``delete`` must not import what they do not
  use): ``pysandbox state ID`` of a running container, ``pysandbox kill ID CONT`` (one RPC
  to its agent) and ``pysandbox delete --force`` of an unknown id (start-up + lookup: a
  real delete is dominated by the VM shutting down) — against ``python -c pass`` of the
  same interpreter.
* **create + start to first output**: ``pysandbox run --bundle`` (runc's ``run``: create,
  start, wait) of a bundle whose process prints one line — time from spawn to that line on
  stdout, and to exit — against ``runc run`` (or ``crun run``) of the very same bundle.
* **pysandbox run IMAGE true** wall time against ``runc run`` of the same rootfs and against
  the boot floor (the same QEMU and kernel booting a busybox initramfs that prints a marker;
  ``bench/run.py``'s floor).

Writes ``<out>/<YYYY-MM-DD>-cli.json`` and prints a table. Everything started is removed in
``finally`` (containers with ``delete --force``, the private roots).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import floor_config, pss_kib, run_floor  # noqa: E402
from bench.stages import breakdown  # noqa: E402
from hypervisor import accel as accel_mod  # noqa: E402
from hypervisor.guest_image import find_image  # noqa: E402
from hypervisor.qemu import find_qemu  # noqa: E402
from sandbox.image import store as images  # noqa: E402
from sandbox.pod.lifecycle import DEFAULT_MEMORY_MIB, kernel_cmdline  # noqa: E402
from sandbox.run.default_spec import default_spec  # noqa: E402

PYSANDBOX = [sys.executable, "-m", "sandbox"]


class Baseline:
    """Another checkout measured alternately with this one (``--baseline``): its venv's
    python, its tree on PYTHONPATH, its guest image and template directory."""

    def __init__(self, spec: str) -> None:
        repo, _, rest = spec.partition(",")
        image, _, templates = rest.partition(",")
        self.repo = Path(repo).resolve()
        self.argv = [str(self.repo / ".venv" / "bin" / "python"), "-m", "sandbox"]
        self.env = {**os.environ, "PYTHONPATH": str(self.repo), **SAFE_PATH}
        if image:
            self.env["PYSANDBOX_GUEST_IMAGE"] = image
        if templates:
            self.env["PYSANDBOX_TEMPLATE_DIR"] = templates


BASELINE: Baseline | None = None
TIMEOUT = 120.0


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def oci_runtime() -> str:
    """runc (containerd's default) if installed, else crun.

    crun 1.8 refuses to run at all on these hosts' hybrid cgroup mounts ("cgroups in hybrid
    mode not supported"), even without cgroup settings; runc runs.
    """
    for name in ("runc", "crun"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("bench/cli.py needs crun or runc for the comparison: apt-get install crun")


def timed(argv: list[str], check: bool = True, env: dict[str, str] | None = None) -> float:
    """Seconds from spawn to exit of ``argv`` (output discarded)."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, env=env or _env())
    elapsed = time.perf_counter() - t0
    if check and done.returncode != 0:
        raise RuntimeError(f"{argv[2:]} failed ({done.returncode}): {done.stderr.decode()[-300:]}")
    return elapsed


def first_output(argv: list[str]) -> tuple[float, float]:
    """(seconds to the first stdout line, seconds to exit) of ``argv``; it must exit 0."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t_line = time.perf_counter() - t0
    _, err = proc.communicate(timeout=TIMEOUT)
    t_exit = time.perf_counter() - t0
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {err.decode()[-300:]}")
    return t_line, t_exit


#: ``python -m sandbox`` puts the current directory first on sys.path: run from a checkout,
#: every variant (the baseline's too) would import that checkout's code. Python 3.11's
#: PYTHONSAFEPATH leaves it out, so PYTHONPATH alone says which code runs.
SAFE_PATH = {"PYTHONSAFEPATH": "1"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **SAFE_PATH}


#: The packages whose byte code every measured command loads.
PACKAGES = ("sandbox", "agentapi", "ocispec", "hypervisor")


def compile_trees(repos: list[Path]) -> None:
    """Byte-compile each checkout's packages (with its own venv's python), as installing a
    package does. A checkout run with PYTHONDONTWRITEBYTECODE=1 in the environment (as on
    the project's machines) otherwise compiles every module it imports from source in every
    command: 20-25 ms of CPU per ``exec`` that no installed pysandbox pays."""
    for repo in repos:
        python = repo / ".venv" / "bin" / "python"
        subprocess.run(
            [str(python if python.exists() else sys.executable), "-m", "compileall", "-q", "-j0"]
            + [str(repo / package) for package in PACKAGES],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def _variants() -> list[tuple[list[str], dict[str, str]]]:
    """(argv prefix, env) of this checkout, then of the baseline if there is one."""
    found = [(PYSANDBOX, _env())]
    if BASELINE is not None:
        found.append((BASELINE.argv, BASELINE.env))
    return found


def _baseline_kind(fn: Callable[[Baseline], Any]) -> dict[str, Callable[[], Any]]:
    """``{"baseline": ...}`` for :func:`alternate` when a baseline is measured, else {}."""
    baseline = BASELINE
    if baseline is None:
        return {}
    return {"baseline": lambda: fn(baseline)}


def _baseline_ratios(stats: dict[str, dict[str, float]], *refs: str) -> dict[str, Any]:
    """The baseline's ratios to ``refs`` and ours to the baseline's (when measured)."""
    if "baseline" not in stats:
        return {}
    base = stats["baseline"]["median"]
    return {
        "baseline_repo": str(BASELINE.repo) if BASELINE else None,
        "baseline_ratio_to": {ref: round(base / stats[ref]["median"], 2) for ref in refs},
        "ratio_to_baseline": round(stats["pysandbox"]["median"] / base, 3),
    }


def wait_for_teardowns(work: Path, timeout: float = 60.0) -> None:
    """Wait until the pods of the roots under ``work`` are gone: a foreground run's VM is
    torn down by a detached process after the run exited (sandbox/run/foreground.py), and
    removing its root under it leaves its QEMU, virtiofsd and mounts behind. Gives up
    after ``timeout`` seconds (the removal then happens all the same)."""
    deadline = time.monotonic() + timeout
    while any(work.glob("*/p/*")) and time.monotonic() < deadline:
        time.sleep(0.1)


def make_bundle(work: Path, args: list[str]) -> Path:
    """A bundle with a private copy of the default busybox rootfs and ``args`` as process.

    Beside it, ``reference_bundle(bundle)`` holds the same spec for crun/runc minus
    ``linux.resources``: these hosts mount cgroups in hybrid mode, where crun refuses any
    cgroup setting ("cgroups in hybrid mode not supported"). pysandbox applies the limits in
    the guest's cgroup v2, so the comparison slightly favours the reference.
    """
    bundle = work / "bundle"
    shutil.copytree(images.ensure_default_image(), bundle / "rootfs", symlinks=True)
    spec = default_spec(args, rootfs="rootfs")
    (bundle / "config.json").write_text(json.dumps(spec))
    reference = reference_bundle(bundle)
    reference.mkdir()
    spec["root"]["path"] = str(bundle / "rootfs")
    spec["linux"].pop("resources", None)
    (reference / "config.json").write_text(json.dumps(spec))
    return bundle


def reference_bundle(bundle: Path) -> Path:
    return bundle.with_name("reference-bundle")


@contextlib.contextmanager
def running_container(root: Path, bundle: Path, container_id: str) -> Iterator[str]:
    """A created and started pysandbox container (its process sleeps); deleted at the end."""
    try:
        # The container's shim inherits our stdio: files, not pipes we would wait on for EOF.
        with tempfile.TemporaryFile() as err:
            done = subprocess.run(
                [
                    *PYSANDBOX,
                    "--root",
                    str(root),
                    "run",
                    "--bundle",
                    str(bundle),
                    "-d",
                    container_id,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=TIMEOUT,
                env=_env(),
            )
            if done.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"run -d failed: {err.read().decode()[-300:]}")
        yield container_id
    finally:
        subprocess.run(
            [*PYSANDBOX, "--root", str(root), "delete", "--force", container_id],
            capture_output=True,
            timeout=TIMEOUT,
            env=_env(),
        )


def alternate(runs: int, kinds: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """Run each of ``kinds`` once per round, in order, for ``runs`` rounds."""
    results: dict[str, list[Any]] = {name: [] for name in kinds}
    for _ in range(runs):
        for name, fn in kinds.items():
            results[name].append(fn())
    return results


def bench_verbs(runs: int, work: Path) -> dict[str, Any]:
    root = work / "root-verbs"
    bundle = make_bundle(work / "verbs", ["sleep", "3600"])
    base = [*PYSANDBOX, "--root", str(root)]
    with running_container(root, bundle, f"bench-verbs-{os.getpid()}") as cid:
        raw = alternate(
            runs * 2,
            {
                "python -c pass": lambda: timed([sys.executable, "-c", "pass"]),
                "pysandbox state": lambda: timed([*base, "state", cid]),
                "pysandbox kill CONT": lambda: timed([*base, "kill", cid, "CONT"]),
                "pysandbox delete --force (unknown id)": lambda: timed(
                    [*base, "delete", "--force", "no-such-container"]
                ),
            },
        )
    stats = {name: summary(values) for name, values in raw.items()}
    floor = stats["python -c pass"]["median"]
    return {
        "seconds": stats,
        "ratio_to_python": {
            name: round(s["median"] / floor, 2)
            for name, s in stats.items()
            if name != "python -c pass"
        },
    }


def bench_create_start(runs: int, work: Path, oci: str) -> dict[str, Any]:
    bundle = make_bundle(work / "create-start", ["echo", "ready"])
    root, oci_root = work / "root-cs", work / "root-oci"
    counter = iter(range(10**6))

    def pysandbox() -> tuple[float, float]:
        cid = f"bench-cs-{os.getpid()}-{next(counter)}"
        return first_output([*PYSANDBOX, "--root", str(root), "run", "--bundle", str(bundle), cid])

    def reference() -> tuple[float, float]:
        cid = f"bench-oci-{os.getpid()}-{next(counter)}"
        return first_output(
            [oci, "--root", str(oci_root), "run", "--bundle", str(reference_bundle(bundle)), cid]
        )

    raw = alternate(runs, {"oci": reference, "pysandbox": pysandbox})
    oci_first = summary([r[0] for r in raw["oci"]])
    ours_first = summary([r[0] for r in raw["pysandbox"]])
    return {
        "reference_runtime": oci,
        "seconds_to_first_output": {"reference": oci_first, "pysandbox": ours_first},
        "seconds_to_exit": {
            "reference": summary([r[1] for r in raw["oci"]]),
            "pysandbox": summary([r[1] for r in raw["pysandbox"]]),
        },
        "ratio_first_output": round(ours_first["median"] / oci_first["median"], 2),
    }


def bench_run(runs: int, work: Path, oci: str) -> dict[str, Any]:
    bundle = make_bundle(work / "run", ["true"])
    oci_root, run_root = work / "root-run-oci", work / "root-run"
    image = find_image()
    accel = accel_mod.detect().chosen
    floor_cfg = floor_config(image, work, accel, DEFAULT_MEMORY_MIB, kernel_cmdline(accel))
    qemu = find_qemu()
    counter = iter(range(10**6))

    def reference() -> float:
        cid = f"bench-run-oci-{os.getpid()}-{next(counter)}"
        return timed(
            [oci, "--root", str(oci_root), "run", "--bundle", str(reference_bundle(bundle)), cid]
        )

    # The warm pool (PYSANDBOX_POOL=1, sandbox/run/pool.py) on a root of its own: measured
    # with a VM ready, which its filler restores at idle priority between the rounds.
    pool_root, pool_env = work / "root-run-pool", {**_env(), "PYSANDBOX_POOL": "1"}
    pool_run = [*PYSANDBOX, "--root", str(pool_root), "run", str(bundle / "rootfs"), "true"]

    def pool_ready(argv: list[str], root: Path, env: dict[str, str]) -> None:
        deadline = time.monotonic() + 120
        while (
            "running"
            not in subprocess.run(
                [*argv, "--root", str(root), "pool", "ls"],
                capture_output=True,
                text=True,
                env=env,
            ).stdout
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("no VM of the pool was ready within 120 s")
            time.sleep(0.2)

    def pooled() -> float:
        pool_ready(PYSANDBOX, pool_root, pool_env)
        return timed(pool_run, env=pool_env)

    pool_stage_runs: list[list[tuple[str, float]]] = []

    def pooled_traced() -> float:
        pool_ready(PYSANDBOX, pool_root, pool_env)
        seconds, stages = traced(
            ["--root", str(pool_root), "run", str(bundle / "rootfs"), "true"], work, pool_env
        )
        pool_stage_runs.append(stages)
        return seconds

    # The baseline's pool on a root of its own (its code, image and templates).
    base_pool_root = work / "root-run-pool-baseline"

    def baseline_pooled(b: Baseline) -> float:
        env = {**b.env, "PYSANDBOX_POOL": "1"}
        pool_ready(b.argv, base_pool_root, env)
        argv = [*b.argv, "--root", str(base_pool_root), "run", str(bundle / "rootfs"), "true"]
        return timed(argv, env=env)

    timed(pool_run, env=pool_env)  # the first run of its kind starts the pool's filler
    if BASELINE is not None:
        base_env = {**BASELINE.env, "PYSANDBOX_POOL": "1"}
        base_argv = [*BASELINE.argv, "--root", str(base_pool_root)]
        timed([*base_argv, "run", str(bundle / "rootfs"), "true"], env=base_env)
    stage_runs: list[list[tuple[str, float]]] = []

    def traced_run() -> float:
        seconds, stages = traced(
            ["--root", str(run_root), "run", str(bundle / "rootfs"), "true"], work
        )
        stage_runs.append(stages)
        return seconds

    raw = alternate(
        runs,
        {
            "floor": lambda: run_floor(floor_cfg, qemu, TIMEOUT)["ready"],
            "oci": reference,
            "pysandbox": lambda: timed(
                [*PYSANDBOX, "--root", str(run_root), "run", str(bundle / "rootfs"), "true"]
            ),
            "pysandbox (traced)": traced_run,
            "pysandbox (warm pool)": pooled,
            "pysandbox (warm pool, traced)": pooled_traced,
            **_baseline_kind(
                lambda b: timed(
                    [*b.argv, "--root", str(run_root), "run", str(bundle / "rootfs"), "true"],
                    env=b.env,
                )
            ),
            **(
                {"baseline (warm pool)": lambda: baseline_pooled(BASELINE)}
                if BASELINE is not None
                else {}
            ),
        },
    )
    subprocess.run(
        [*PYSANDBOX, "--root", str(pool_root), "pool", "drain"], capture_output=True, env=pool_env
    )
    if BASELINE is not None:
        subprocess.run(
            [*BASELINE.argv, "--root", str(base_pool_root), "pool", "drain"],
            capture_output=True,
            env={**BASELINE.env, "PYSANDBOX_POOL": "1"},
        )
    stats = {name: summary(values) for name, values in raw.items()}
    ours = stats["pysandbox"]["median"]
    return {
        "reference_runtime": oci,
        "seconds": stats,
        "ratio_to_floor": round(ours / stats["floor"]["median"], 2),
        "warm_pool_ratio_to_floor": round(
            stats["pysandbox (warm pool)"]["median"] / stats["floor"]["median"], 2
        ),
        "ratio_to_reference": round(ours / stats["oci"]["median"], 2),
        **_baseline_ratios(stats, "floor", "oci"),
        **(
            {
                "baseline_warm_pool_ratio_to_floor": round(
                    stats["baseline (warm pool)"]["median"] / stats["floor"]["median"], 2
                ),
                "warm_pool_ratio_to_baseline": round(
                    stats["pysandbox (warm pool)"]["median"]
                    / stats["baseline (warm pool)"]["median"],
                    3,
                ),
            }
            if "baseline (warm pool)" in stats
            else {}
        ),
        "stages_median_seconds": median_stages(stage_runs),
        "warm_pool_stages_median_seconds": median_stages(pool_stage_runs),
    }


def traced(
    argv: list[str], work: Path, env: dict[str, str] | None = None
) -> tuple[float, list[tuple[str, float]]]:
    """Wall seconds of ``pysandbox ARGV`` run under bench/stages.py (environment ``env``,
    default ours), and its stages."""
    out = work / "stages.json"
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "stages.py"), str(out), *argv],
        capture_output=True,
        timeout=TIMEOUT,
        env={**(env or _env()), "PYSANDBOX_BENCH_T0": repr(t0)},
    )
    exited = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed ({done.returncode}): {done.stderr.decode()[-300:]}")
    return exited - t0, breakdown(json.loads(out.read_text()), exited)


def median_stages(runs: list[list[tuple[str, float]]]) -> list[tuple[str, float]]:
    """Per stage name (first-seen order), the median over the runs that have it."""
    order: list[str] = []
    values: dict[str, list[float]] = {}
    for stages in runs:
        seen: dict[str, float] = {}
        for name, seconds in stages:
            seen[name] = seen.get(name, 0.0) + seconds
        for name, seconds in seen.items():
            if name not in values:
                order.append(name)
                values[name] = []
            values[name].append(seconds)
    return [(name, round(statistics.median(values[name]), 4)) for name in order]


def vmm_pss_kib(root: Path) -> int:
    """PSS (KiB) of the QEMU, virtiofsd and agent proxy processes of the pods under
    ``root`` (found by their command lines naming it)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if (str(root) + "/").encode() not in cmdline:  # not ROOT-b
            continue
        if any(k in cmdline for k in (b"qemu-system", b"virtiofsd", b"agent_proxy")):
            total += pss_kib(int(entry.name))
    return total


def bench_exec(runs: int, work: Path, oci: str) -> dict[str, Any]:
    """``pysandbox exec RUN true`` into a running detached run of the ``default`` image (by
    name, as users run it: a store entry, whose files the guest may keep cached) against
    ``runc exec`` into a running runc container of the same rootfs; PSS of the run's VM
    processes."""
    images.ensure_default_image()  # built once, outside the timed runs
    root = work / "root-exec"
    name = f"bench-exec-{os.getpid()}"
    bundle = make_bundle(work / "exec", ["sleep", "3600"])
    oci_root, oci_id = work / "root-exec-oci", f"bench-exec-oci-{os.getpid()}"
    base = [*PYSANDBOX, "--root", str(root)]
    sleep = ["sleep", "3600"]
    root_b = work / "root-exec-b"  # the baseline's run (if any), for its own PSS
    for (argv, env), run_root in zip(_variants(), (root, root_b), strict=False):
        subprocess.run(
            [*argv, "--root", str(run_root), "run", "-d", "--name", name, "default", *sleep],
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
            env=env,
        )
    subprocess.run(
        [
            oci,
            "--root",
            str(oci_root),
            "run",
            "-d",
            "--bundle",
            str(reference_bundle(bundle)),
            oci_id,
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )
    try:
        time.sleep(3)  # settle before PSS
        pss = vmm_pss_kib(root)
        pss_b = vmm_pss_kib(root_b) if BASELINE is not None else None
        raw = alternate(
            runs * 2,
            {
                "oci": lambda: timed([oci, "--root", str(oci_root), "exec", oci_id, "true"]),
                "pysandbox": lambda: timed([*base, "exec", name, "true"]),
                **_baseline_kind(
                    lambda b: timed(
                        [*b.argv, "--root", str(root_b), "exec", name, "true"], env=b.env
                    )
                ),
            },
        )
        stage_runs = [
            traced(["--root", str(root), "exec", name, "true"], work)[1] for _ in range(runs)
        ]
    finally:
        for (argv, env), run_root in zip(_variants(), (root, root_b), strict=False):
            subprocess.run(
                [*argv, "--root", str(run_root), "rm", "-f", name],
                capture_output=True,
                timeout=TIMEOUT,
                env=env,
            )
        subprocess.run(
            [oci, "--root", str(oci_root), "delete", "--force", oci_id],
            capture_output=True,
            timeout=TIMEOUT,
        )
    stats = {k: summary(v) for k, v in raw.items()}
    return {
        "reference_runtime": oci,
        "seconds": stats,
        "ratio_to_reference": round(stats["pysandbox"]["median"] / stats["oci"]["median"], 2),
        **_baseline_ratios(stats, "oci"),
        "stages_median_seconds": median_stages(stage_runs),
        "idle_run_vmm_pss_kib": pss,
        "baseline_idle_run_vmm_pss_kib": pss_b,
    }


def stream_seconds(argv: list[str], expected: int, env: dict[str, str] | None = None) -> float:
    """Seconds from the first stdout byte of ``argv`` to its EOF (``expected`` bytes)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env or _env(),
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    first = os.read(fd, 1 << 20)
    t0 = time.perf_counter()
    got = len(first)
    while chunk := os.read(fd, 1 << 20):
        got += len(chunk)
    elapsed = time.perf_counter() - t0
    proc.wait(TIMEOUT)
    if proc.returncode != 0 or got != expected:
        raise RuntimeError(f"{argv} failed ({proc.returncode}), {got} of {expected} bytes")
    return elapsed


def bench_stream(runs: int, work: Path, oci: str, mib: int) -> dict[str, Any]:
    """``pysandbox run ROOTFS dd if=/dev/zero bs=1M count=MIB``: stdout MiB/s (first byte
    to EOF) against ``runc run`` of the same command and rootfs."""
    command = ["dd", "if=/dev/zero", "bs=1M", f"count={mib}"]
    bundle = make_bundle(work / "stream", command)
    oci_root, run_root = work / "root-stream-oci", work / "root-stream"
    counter = iter(range(10**6))
    size = mib << 20
    raw = alternate(
        runs,
        {
            "oci": lambda: (
                mib
                / stream_seconds(
                    [
                        oci,
                        "--root",
                        str(oci_root),
                        "run",
                        "--bundle",
                        str(reference_bundle(bundle)),
                        f"bench-stream-{os.getpid()}-{next(counter)}",
                    ],
                    size,
                )
            ),
            "pysandbox": lambda: (
                mib
                / stream_seconds(
                    [*PYSANDBOX, "--root", str(run_root), "run", str(bundle / "rootfs"), *command],
                    size,
                )
            ),
            **_baseline_kind(
                lambda b: (
                    mib
                    / stream_seconds(
                        [*b.argv, "--root", str(run_root), "run", str(bundle / "rootfs"), *command],
                        size,
                        env=b.env,
                    )
                )
            ),
        },
    )
    stats = {k: summary(v) for k, v in raw.items()}
    return {
        "reference_runtime": oci,
        "mib": mib,
        "mib_per_second": stats,
        "ratio_to_reference": round(stats["pysandbox"]["median"] / stats["oci"]["median"], 3),
    }


def _row(label: str, stats: dict[str, float]) -> str:
    return f"{label:<48} {stats['median']:8.3f} {stats['min']:8.3f} {stats['max']:8.3f}"


def report(result: dict[str, Any], oci: str) -> None:
    """The table of :func:`main` (every figure with its ratio)."""
    heading = f"seconds (median of {result['runs']}+ runs)"
    print(f"{heading:<48} {'median':>8} {'min':>8} {'max':>8}")
    verbs = result.get("verbs")
    if verbs:
        for name, stats in verbs["seconds"].items():
            print(_row(name, stats))
        for name, ratio in verbs["ratio_to_python"].items():
            print(f"  {name} / python -c pass: {ratio:.2f}x")
    create_start = result.get("create_start")
    if create_start:
        cs = create_start["seconds_to_first_output"]
        print(_row(f"{oci} run: spawn -> first output", cs["reference"]))
        print(_row("pysandbox run --bundle: spawn -> first output", cs["pysandbox"]))
        print(f"  ratio: {create_start['ratio_first_output']:.2f}x")
    run = result.get("run_true")
    if run:
        print(_row("floor: bare QEMU boot to marker", run["seconds"]["floor"]))
        print(_row(f"{oci} run ROOTFS true", run["seconds"]["oci"]))
        print(_row("pysandbox run ROOTFS true", run["seconds"]["pysandbox"]))
        print(
            f"  ratio to floor: {run['ratio_to_floor']:.2f}x, to {oci}: "
            f"{run['ratio_to_reference']:.2f}x"
        )
        print(_row("pysandbox run ROOTFS true, warm pool", run["seconds"]["pysandbox (warm pool)"]))
        print(f"  warm pool ratio to floor: {run['warm_pool_ratio_to_floor']:.2f}x")
        if "baseline" in run["seconds"]:
            print(_row("baseline: pysandbox run ROOTFS true", run["seconds"]["baseline"]))
            print(
                f"  baseline ratio to floor: {run['baseline_ratio_to']['floor']:.2f}x;"
                f" ours / baseline: {run['ratio_to_baseline']:.3f}"
            )
        if "baseline (warm pool)" in run["seconds"]:
            print(_row("baseline: warm pool", run["seconds"]["baseline (warm pool)"]))
            print(
                f"  baseline warm pool ratio to floor: "
                f"{run['baseline_warm_pool_ratio_to_floor']:.2f}x;"
                f" ours / baseline: {run['warm_pool_ratio_to_baseline']:.3f}"
            )
        print("  stages (median seconds, traced runs):")
        for name, seconds in run["stages_median_seconds"]:
            print(f"    {name:<44} {seconds:8.3f}")
        print("  stages of a warm-pool run (median seconds, traced runs):")
        for name, seconds in run.get("warm_pool_stages_median_seconds", []):
            print(f"    {name:<44} {seconds:8.3f}")
    exec_ = result.get("exec_true")
    if exec_:
        print(_row(f"{oci} exec CONTAINER true", exec_["seconds"]["oci"]))
        print(_row("pysandbox exec RUN true", exec_["seconds"]["pysandbox"]))
        print(f"  ratio to {oci}: {exec_['ratio_to_reference']:.2f}x")
        print("  stages (median seconds, traced runs):")
        for name, seconds in exec_["stages_median_seconds"]:
            print(f"    {name:<44} {seconds:8.3f}")
        print(
            f"  idle detached run: QEMU + virtiofsd + proxy PSS "
            f"{exec_['idle_run_vmm_pss_kib'] / 1024:.0f} MiB"
            + (
                f" (baseline {exec_['baseline_idle_run_vmm_pss_kib'] / 1024:.0f} MiB)"
                if exec_.get("baseline_idle_run_vmm_pss_kib")
                else ""
            )
        )
    stream = result.get("stream")
    if stream:
        rate = stream["mib_per_second"]
        print(f"{'MiB/s (first byte -> EOF, ' + str(stream['mib']) + ' MiB stdout)':<48}")
        print(_row(f"{oci} run dd", rate["oci"]))
        print(_row("pysandbox run dd", rate["pysandbox"]))
        print(f"  ratio to {oci}: {stream['ratio_to_reference']:.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pysandbox CLI benchmark")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("--stream-mib", type=int, default=100)
    parser.add_argument(
        "--baseline",
        metavar="REPO[,GUEST_IMAGE[,TEMPLATE_DIR]]",
        help="also measure this checkout (its .venv) alternately: run, exec, stream",
    )
    parser.add_argument("--name", default="cli", help="JSON file: <date>-<name>.json")
    parser.add_argument(
        "--only",
        choices=["verbs", "create-start", "run", "exec", "stream"],
        action="append",
        help="run only these groups (repeatable; default all)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    global BASELINE
    if args.baseline:
        BASELINE = Baseline(args.baseline)
    oci = oci_runtime()
    compile_trees([REPO] + ([BASELINE.repo] if BASELINE is not None else []))
    work = Path(tempfile.mkdtemp(prefix="psb-bench-cli-", dir="/tmp"))
    started = time.time()
    groups = set(args.only or ["verbs", "create-start", "run", "exec", "stream"])
    result: dict[str, Any] = {
        "date": datetime.datetime.fromtimestamp(started, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "runs": args.runs,
        "byte_compiled": True,  # compile_trees: both checkouts as installed packages are
    }
    try:
        if "verbs" in groups:
            result["verbs"] = bench_verbs(args.runs, work)
        if "create-start" in groups:
            result["create_start"] = bench_create_start(args.runs, work, oci)
        if "run" in groups:
            result["run_true"] = bench_run(args.runs, work, oci)
        if "exec" in groups:
            result["exec_true"] = bench_exec(args.runs, work, oci)
        if "stream" in groups:
            result["stream"] = bench_stream(args.runs, work, oci, args.stream_mib)
    finally:
        wait_for_teardowns(work)
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report(result, Path(oci).name)
    if not args.no_json:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"{datetime.date.today().isoformat()}-{args.name}.json"
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
