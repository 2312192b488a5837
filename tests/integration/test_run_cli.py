"""``pysandbox run`` as a user types it: options, exit codes, isolation, bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(root: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "--root", str(root), "run", *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def root(vm_root: Path) -> Iterator[Path]:
    """A --root of its own: the leftover checks must not see other tests' pods."""
    path = Path(tempfile.mkdtemp(prefix="psr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _leftovers(root: Path) -> list[str]:
    pods = list((root / "p").glob("*")) if (root / "p").exists() else []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        mounts = [line.split()[4] for line in mountinfo if str(root) in line]
    return [str(p) for p in pods] + mounts


def test_output_and_exit_code(root: Path) -> None:
    done = run(root, "default", "sh", "-c", "echo hi; echo oops >&2; exit 42")
    assert (done.returncode, done.stdout, done.stderr) == (42, b"hi\n", b"oops\n")
    assert _leftovers(root) == []


def test_env_workdir_user_and_stdin(root: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("FROM_FILE=yes\n# comment\n")
    done = run(
        root,
        "-i",
        "-e",
        "A=1",
        "--env-file",
        str(env_file),
        "-w",
        "/tmp",
        "-u",
        "1000:1000",
        "default",
        "sh",
        "-c",
        'echo "$A $FROM_FILE"; pwd; id -u; cat',
        stdin=b"piped in\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == ["1 yes", "/tmp", "1000", "piped in"]


def test_user_name_from_the_image_passwd(root: Path) -> None:
    # The default image lists nobody as 65534:65534; -u takes names as docker does.
    done = run(root, "-u", "nobody", "default", "sh", "-c", "id -u; id -g")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["65534", "65534"]


def test_volumes_read_write_and_read_only(root: Path, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "input.txt").write_text("from the host\n")
    done = run(
        root,
        "-v",
        f"{rw}:/out",
        "-v",
        f"{ro}:/in:ro",
        "default",
        "sh",
        "-c",
        "cat /in/input.txt; echo result > /out/r.txt; "
        "touch /in/nope 2>/dev/null && echo ro-broken || echo ro-ok",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"from the host\nro-ok\n"
    assert (rw / "r.txt").read_text() == "result\n"
    assert not (ro / "nope").exists()
    assert _leftovers(root) == []


def test_host_files_outside_volumes_are_not_reachable(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    done = run(
        root,
        "default",
        "sh",
        "-c",
        f"cat {secret} /proc/1/root{secret} 2>&1; ls /work /run/pysandbox 2>&1; true",
    )
    assert b"host secret" not in done.stdout
    assert b"No such file or directory" in done.stdout


def test_command_not_found_is_127(root: Path) -> None:
    done = run(root, "default", "no-such-command")
    assert done.returncode == 127
    assert (
        done.stderr.strip()
        == b'pysandbox: exec: "no-such-command": executable file not found in $PATH'
    )
    assert _leftovers(root) == []


def test_timeout_kills_and_exits_124(root: Path) -> None:
    done = run(root, "--timeout", "2", "default", "sleep", "60")
    assert done.returncode == 124 and b"timed out" in done.stderr
    assert _leftovers(root) == []


def test_memory_limit_reports_oom(root: Path) -> None:
    done = run(
        root,
        "--memory",
        "24m",
        "default",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
    )
    assert done.returncode == 137 and b"out of memory" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/image", "true"], b"image /no/such/image not found"),
        (["-v", "relative:/x", "default", "true"], b"invalid volume"),
        (["-v", "/tmp:/x:bogus", "default", "true"], b"invalid volume"),
        (["--memory", "lots", "default", "true"], b"invalid size"),
        (["-e", "1BAD=x", "default", "true"], b"invalid environment variable"),
        (["-u", "ghost", "default", "true"], b"unknown user 'ghost'"),
        (["-u", "1000:", "default", "true"], b"invalid user"),
        (["--bogus-flag", "default", "true"], b"unrecognized arguments"),
    ],
)
def test_bad_input_one_line_error_nothing_left(root: Path, args: list[str], message: bytes) -> None:
    done = run(root, *args)
    assert done.returncode == 125
    assert message in done.stderr and b"Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert _leftovers(root) == []
    assert os.path.exists(root)
