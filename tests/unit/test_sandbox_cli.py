"""The CLI surface: parsing, errors as one line, JSON log lines, default specs, signals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ocispec import seccomp
from ocispec.spec import parse_spec
from sandbox.errors import ConfigError
from sandbox.run.default_spec import default_seccomp, default_spec
from sandbox.runtime.bundle import load as load_bundle
from sandbox.runtime.bundle import pod_of
from sandbox.runtime.kill import parse_signal

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_default_spec_is_accepted_by_the_guest_runtime() -> None:
    spec = default_spec(["echo", "hi"], rootfs="/rootfs")
    parsed = parse_spec(spec)
    assert parsed.root_path == "/rootfs"
    seccomp.compile(default_seccomp())


def test_unknown_container_one_line_error_and_json_log(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    done = cli("--root", str(tmp_path), "--log", str(log), "--log-format", "json", "state", "nope")
    assert done.returncode == 1
    assert done.stderr == "pysandbox: nope: container does not exist\n"
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and entry["msg"] == "nope: container does not exist"
    assert "time" in entry


def test_usage_errors_exit_2_and_run_misuse_125(tmp_path: Path) -> None:
    done = cli("--root", str(tmp_path), "frobnicate")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    done = cli("--root", str(tmp_path), "run", "--memory")
    assert done.returncode == 125 and "Traceback" not in done.stderr


def test_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_bundle(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_bundle(tmp_path)
    mount_ns = {"namespaces": [{"type": "mount"}]}
    config = {"root": {"path": "r"}, "process": {}, "linux": mount_ns}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: process\.args: must not be empty"):
        load_bundle(tmp_path)
    done = cli("--root", str(tmp_path / "r"), "create", "--bundle", str(tmp_path), "c1")
    assert done.returncode == 1 and "process.args: must not be empty" in done.stderr
    assert not (tmp_path / "r" / "c1").exists()


def test_delete_force_of_unknown_id_succeeds(tmp_path: Path) -> None:
    assert cli("--root", str(tmp_path), "delete", "--force", "ghost").returncode == 0
    assert cli("--root", str(tmp_path), "delete", "ghost").returncode == 1


def test_spec_writes_default_config_once(tmp_path: Path) -> None:
    assert cli("spec", "--bundle", str(tmp_path)).returncode == 0
    assert json.loads((tmp_path / "config.json").read_text())["ociVersion"]
    again = cli("spec", "--bundle", str(tmp_path))
    assert again.returncode == 1 and "already exists" in again.stderr


def test_features_is_json() -> None:
    done = cli("features")
    assert done.returncode == 0 and "seccomp" in json.loads(done.stdout)["linux"]


@pytest.mark.parametrize(
    ("text", "number"), [("9", 9), ("KILL", 9), ("SIGTERM", 15), ("term", 15), ("SIGUSR1", 10)]
)
def test_parse_signal(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("bad", ["0", "65", "SIGNOPE", "", "-1"])
def test_parse_signal_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid signal"):
        parse_signal(bad)


def test_pods_from_cri_annotations() -> None:
    sandbox = {
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "pod1",
        }
    }
    member = {
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1",
        }
    }
    crio = {
        "annotations": {
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.cri-o.SandboxID": "pod2",
        }
    }
    assert pod_of("pause", sandbox["annotations"]) == ("pod1", True)
    assert pod_of("app", member["annotations"]) == ("pod1", False)
    assert pod_of("app2", crio["annotations"]) == ("pod2", False)
    assert pod_of("lonely", {}) == ("lonely", True)


@pytest.mark.parametrize(
    ("given", "limit"),
    [("104857600", 104857600), ("100m", 100 << 20), ("1g", 1 << 30), ("64K", 64 << 10)],
)
def test_update_memory_takes_runcs_sizes(
    given: str, limit: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``runc update --memory 100m`` works; ``pysandbox update`` said "give bytes"."""
    from sandbox.cli.main import main
    from sandbox.runtime import control

    asked: list[dict[str, object]] = []
    monkeypatch.setattr(control, "update", lambda _root, _id, res: asked.append(res))
    with pytest.raises(SystemExit) as exited:
        main(["--root", str(tmp_path), "update", "--memory", given, "c1"])
    assert exited.value.code == 0
    assert asked == [{"memory": {"limit": limit}}]


def test_update_memory_refuses_what_runc_refuses(tmp_path: Path) -> None:
    done = cli("--root", str(tmp_path), "update", "--memory", "lots", "c1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "pysandbox: invalid --memory 'lots': give bytes, or a number with k, m or g (e.g. 100m)"
    ]


@pytest.mark.parametrize(("verb", "status"), [(["list"], 1), (["run", "default", "true"], 125)])
def test_a_log_file_that_cannot_be_opened_is_one_error_as_runc_s(
    tmp_path: Path, verb: list[str], status: int
) -> None:
    """runc refuses to run when its --log cannot be opened (``open FILE: no such file or
    directory``, exit 1): errors are not silently lost. ``run`` exits 125, docker's status for
    its own failures; nothing is created (no VM boots: the flag is checked first)."""
    log = tmp_path / "missing" / "x.log"
    runc = subprocess.run(
        ["runc", "--root", str(tmp_path / "runc"), "--log", str(log), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert runc.returncode == 1 and "no such file or directory" in runc.stderr
    done = cli("--root", str(tmp_path / "root"), "--log", str(log), *verb)
    assert (done.returncode, done.stdout) == (status, "")
    assert done.stderr == (
        f"pysandbox: cannot open the --log file {log}: No such file or directory; give a file "
        "in an existing, writable directory\n"
    )
    assert not log.parent.exists() and not (tmp_path / "root").exists()
