"""agent.oci.seccomp_cache: a profile's program is compiled once per guest, then read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.oci import seccomp_cache
from ocispec import seccomp, spec
from ocispec.errors import SpecError

PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
    "flags": ["SECCOMP_FILTER_FLAG_LOG"],
    "syscalls": [
        {"names": ["mount", "umount2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {"names": ["kexec_load"], "action": "SCMP_ACT_KILL"},
    ],
}


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The field paths every real compilation was asked for."""
    seen: list[str] = []
    real = seccomp_cache.seccomp_filter

    def counting(profile: object, where: str) -> seccomp.Filter:
        seen.append(where)
        return real(profile, where)

    monkeypatch.setattr(seccomp_cache, "seccomp_filter", counting)
    return seen


def test_a_profile_is_compiled_once_and_then_read(tmp_path: Path, compiles: list[str]) -> None:
    direct = seccomp.compile(PROFILE, at="process.seccomp")
    first = seccomp_cache.compiled(PROFILE, "process.seccomp", str(tmp_path))
    again = seccomp_cache.compiled(dict(reversed(PROFILE.items())), "x", str(tmp_path))
    assert compiles == ["process.seccomp"]  # the second (same profile, keys reordered) read it
    for found in (first, again):
        assert (found.program, found.flags) == (direct.program, direct.flags)
    assert [p.name for p in tmp_path.iterdir()] == [seccomp_cache.key(PROFILE)]
    assert (tmp_path.stat().st_mode & 0o777, len(first)) == (0o700, len(direct))


def test_another_profile_is_another_program(tmp_path: Path, compiles: list[str]) -> None:
    other = {**PROFILE, "defaultAction": "SCMP_ACT_ERRNO"}
    one = seccomp_cache.compiled(PROFILE, "a", str(tmp_path))
    two = seccomp_cache.compiled(other, "b", str(tmp_path))
    assert compiles == ["a", "b"] and one.program != two.program
    assert seccomp_cache.key(PROFILE) != seccomp_cache.key(other)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00", b"\x00\x00\x00\x00", b"\0" * 11])
def test_a_damaged_file_is_compiled_anew(
    tmp_path: Path, compiles: list[str], content: bytes
) -> None:
    (tmp_path / seccomp_cache.key(PROFILE)).write_bytes(content)
    found = seccomp_cache.compiled(PROFILE, "p", str(tmp_path))
    assert compiles == ["p"]
    assert found.program == seccomp.compile(PROFILE).program


@pytest.mark.parametrize(
    "profile",
    [
        {"defaultAction": "SCMP_ACT_BOGUS"},
        {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": "no"},
        ["not", "an", "object"],
        None,
    ],
)
def test_a_bad_profile_fails_as_without_the_cache_and_is_not_kept(
    tmp_path: Path, profile: object
) -> None:
    process = {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "seccomp": profile}
    if profile is None:  # null is "no profile" to parse_process: the compiler sees it as is
        with pytest.raises(SpecError) as plain:
            spec.seccomp_filter(profile, "process.seccomp")
    else:
        with pytest.raises(SpecError) as plain:
            spec.parse_process(process)
    with pytest.raises(SpecError) as cached:
        if profile is None:
            seccomp_cache.compiled(profile, "process.seccomp", str(tmp_path))
        else:
            spec.parse_process(
                process,
                compile_seccomp=lambda p, at: seccomp_cache.compiled(p, at, str(tmp_path)),
            )
    assert cached.value.message == plain.value.message
    assert list(tmp_path.iterdir()) == []


def test_no_more_than_max_entries_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiles: list[str]
) -> None:
    monkeypatch.setattr(seccomp_cache, "MAX_ENTRIES", 2)
    profiles = [{**PROFILE, "defaultErrnoRet": n} for n in range(3)]
    for profile in profiles:
        seccomp_cache.compiled(profile, "p", str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2
    seccomp_cache.compiled(profiles[2], "p", str(tmp_path))  # not kept: compiled again
    assert len(compiles) == 4


def test_an_unwritable_directory_only_costs_the_compilation(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    found = seccomp_cache.compiled(PROFILE, "p", str(blocker / "cache"))
    assert found.program == seccomp.compile(PROFILE).program
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
