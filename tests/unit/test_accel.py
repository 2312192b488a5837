"""Accelerator detection against fake sysroots."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.accel import ENV_VAR, detect, has_vhost_vsock, kvm_status, requested
from hypervisor.errors import AccelError

CPUINFO = "processor\t: 0\nflags\t\t: fpu vme {extra} sse2\n\nprocessor\t: 1\nflags\t\t: fpu\n"


def sysroot(tmp_path: Path, *, kvm: bool = True, flag: str = "vmx", pvm: bool = False) -> Path:
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc").mkdir()
    (tmp_path / "sys" / "module").mkdir(parents=True)
    if kvm:
        (tmp_path / "dev" / "kvm").touch()
    if pvm:
        (tmp_path / "sys" / "module" / "kvm_pvm").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(CPUINFO.format(extra=flag))
    return tmp_path


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_kvm_with_hardware_virtualization(tmp_path: Path, flag: str) -> None:
    report = detect(sysroot(tmp_path, flag=flag), environ={})
    assert report.kvm_usable
    assert report.chosen == "kvm"
    assert flag in report.reason
    assert not report.forced


def test_no_dev_kvm_means_tcg(tmp_path: Path) -> None:
    report = detect(sysroot(tmp_path, kvm=False), environ={})
    assert (report.kvm_usable, report.chosen) == (False, "tcg")
    assert "/dev/kvm does not exist" in report.reason


def test_pvm_host_means_tcg(tmp_path: Path) -> None:
    report = detect(sysroot(tmp_path, flag="", pvm=True), environ={})
    assert report.chosen == "tcg"
    assert "pvm" in report.reason.lower()


def test_pvm_wins_even_with_vmx(tmp_path: Path) -> None:
    assert kvm_status(sysroot(tmp_path, pvm=True))[0] is False


def test_no_vmx_or_svm_means_tcg(tmp_path: Path) -> None:
    report = detect(sysroot(tmp_path, flag="sse4_2"), environ={})
    assert report.chosen == "tcg"
    assert "vmx or svm" in report.reason


def test_missing_cpuinfo_means_tcg(tmp_path: Path) -> None:
    root = sysroot(tmp_path)
    (root / "proc" / "cpuinfo").unlink()
    assert detect(root, environ={}).chosen == "tcg"


def test_empty_sysroot_means_tcg(tmp_path: Path) -> None:
    assert detect(tmp_path, environ={}).chosen == "tcg"


@pytest.mark.parametrize(("value", "chosen"), [("kvm", "kvm"), ("tcg", "tcg"), ("TCG", "tcg")])
def test_override(tmp_path: Path, value: str, chosen: str) -> None:
    report = detect(sysroot(tmp_path, kvm=False), environ={ENV_VAR: value})
    assert report.chosen == chosen
    assert report.forced
    assert ENV_VAR in report.reason


def test_override_tcg_on_kvm_host(tmp_path: Path) -> None:
    report = detect(sysroot(tmp_path), environ={ENV_VAR: "tcg"})
    assert (report.kvm_usable, report.chosen) == (True, "tcg")


@pytest.mark.parametrize("value", ["", "auto", " auto "])
def test_auto(tmp_path: Path, value: str) -> None:
    assert requested({ENV_VAR: value}) == "auto"
    assert detect(sysroot(tmp_path), environ={ENV_VAR: value}).chosen == "kvm"


def test_invalid_override(tmp_path: Path) -> None:
    with pytest.raises(AccelError, match="kvm, tcg or auto"):
        detect(sysroot(tmp_path), environ={ENV_VAR: "hvf"})


def test_env_is_read_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "kvm")
    assert detect(sysroot(tmp_path, kvm=False)).chosen == "kvm"


def test_has_vhost_vsock(tmp_path: Path) -> None:
    assert not has_vhost_vsock(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "vhost-vsock").touch()
    assert has_vhost_vsock(tmp_path)
