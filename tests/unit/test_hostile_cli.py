"""Hostile command lines (hypothesis): one line, a failure status, no VM, nothing left.

``pysandbox`` is run in this process with the fake drivers installed
(tests/unit/fake_drivers.py), so that a VM the host should not have started shows as a
recorded event instead of a boot. Generated: ``run`` with one to three invalid options among
valid ones, and every id-taking verb with hostile ids. What a user relies on: the command
fails before any VM with exactly one line on stderr (``pysandbox: ...``), no traceback, and
leaves nothing under ``--root``. ``PYSANDBOX_HYPOTHESIS=large`` draws more.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sandbox.cli.main import main
from tests.unit.fake_drivers import FakeDrivers, fixture_drivers

#: Options ``run`` must refuse before it boots anything (their value is the problem).
INVALID_RUN_OPTIONS = [
    *(["--memory", v] for v in ("60g", "4096", "-1", "0", "1e9", "abc", "9" * 30, "")),
    *(["--timeout", v] for v in ("-1", "0", "nan", "inf", "x", "1e400")),
    *(["--cpus", v] for v in ("0", "-2", "1000", "nan", "x")),
    *(["--name", v] for v in ("a/b", "..", "x" * 1000, "", "-x", "a\nb", "\x1b[31m")),
    *(
        ["-v", v]
        for v in (
            "relative:/x",
            "/nonexistent-psb-hostile:/x",
            "/tmp:relative",
            "/tmp:/x:bogus",
            ":",
            "/tmp:/x:ro:rw",
            "/tmp:/../..",
            "/tmp:/",
        )
    ),
    *(["--user", v] for v in ("root:root:root", "nobody-here", "99999999999", "-1:-1")),
    *(["--hostname", v] for v in ("a" * 300, "bad host", "-x", "\x07")),
    *(["-e", v] for v in ("=value", "", "A\x00B=c")),
    ["--workdir", "relative/dir"],
]
#: The fake drivers' event list, emptied before each command.
FAKE_EVENTS: list[tuple[object, ...]] = []
#: The fake drivers' event list, emptied before each command.
FAKE_EVENTS: list[tuple[object, ...]] = []
VALID_RUN_OPTIONS = [["--rm"], ["-e", "A=b"], ["--memory", "256m"], ["-i"], ["--cpus", "1"]]
ID_VERBS = [
    *("state", "start", "kill", "delete", "exec", "ps"),
    *("pause", "resume", "logs", "rm", "stop"),
]
HOSTILE_IDS = st.one_of(
    st.sampled_from(["..", "a/b", "/etc/passwd", "x" * 5000, "-", ".", "a\nb", "\x1b]0;x\x07"]),
    st.text(min_size=1, max_size=300).filter(lambda t: "\x00" not in t),
)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeDrivers, Path]]:
    tmp = tmp_path_factory.mktemp("hostile-cli")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for drivers in fixture_drivers(tmp, monkeypatch):
            FAKE_EVENTS[:] = []
            drivers.events = FAKE_EVENTS
            yield drivers, tmp


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``pysandbox ARGV`` in this process: its exit status and stderr (signal handlers a
    verb installs are put back)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    capsys.readouterr()
    FAKE_EVENTS.clear()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return code, capsys.readouterr().err


_roots = itertools.count()


def new_root(base: Path) -> Path:
    """A --root of its own for one example (none of its files exist yet)."""
    return base / f"root{next(_roots)}"


def assert_refused(argv: list[str], code: int, err: str, root: Path, fake: FakeDrivers) -> None:
    assert code != 0, (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert err.count("\n") == 1 and err.startswith("pysandbox: "), (argv, err)
    assert err.rstrip("\n").isprintable(), (argv, err)
    assert fake.events == [], (argv, fake.events)  # no VM, no share, no mount
    left = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert left == [], (argv, left)


@settings(
    max_examples=max(25, settings.default.max_examples // 4),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    invalid=st.lists(st.sampled_from(INVALID_RUN_OPTIONS), min_size=1, max_size=3),
    valid=st.lists(st.sampled_from(VALID_RUN_OPTIONS), max_size=2),
    detach=st.booleans(),
    data=st.data(),
)
def test_run_with_an_invalid_option_is_refused_before_any_vm(
    fake: tuple[FakeDrivers, Path],
    capsys: pytest.CaptureFixture[str],
    invalid: list[list[str]],
    valid: list[list[str]],
    detach: bool,
    data: st.DataObject,
) -> None:
    drivers, base = fake
    root = new_root(base)
    flags = {o[0] for o in invalid}
    valid = [o for o in valid if o[0] not in flags]  # a later value would win
    options = data.draw(st.permutations([*invalid, *valid]))
    if detach:
        options = [["-d"], *[o for o in options if o != ["-i"]]]
    argv = ["--root", str(root), "run", *(a for o in options for a in o), "default", "true"]
    code, err = run_cli(argv, capsys)
    if code == 2:  # the parser's usage error
        assert "Traceback" not in err and err.count("\n") <= 2, repr(err)
        assert drivers.events == []
        return
    assert code == 125, (argv, err)
    assert_refused(argv, code, err, root, drivers)


@settings(
    max_examples=max(25, settings.default.max_examples // 4),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(verb=st.sampled_from(ID_VERBS), container_id=HOSTILE_IDS)
@example(verb="rm", container_id="..")  # left <root>/locks/run-....lock behind
@example(verb="rm", container_id="no-such-run")  # likewise
def test_a_hostile_id_is_one_line_and_touches_nothing(
    fake: tuple[FakeDrivers, Path],
    capsys: pytest.CaptureFixture[str],
    verb: str,
    container_id: str,
) -> None:
    drivers, base = fake
    root = new_root(base)
    argv = ["--root", str(root), verb, container_id]
    if verb == "exec":
        argv.append("true")
    if container_id.startswith("-"):
        argv.insert(-2 if verb == "exec" else -1, "--")
    code, err = run_cli(argv, capsys)
    if code == 2:
        assert "Traceback" not in err and drivers.events == [], repr(err)
        return
    assert_refused(argv, code, err, root, drivers)


@pytest.mark.parametrize("volume", ["/tmp:/", "/tmp:/../..", "/tmp://:ro"])
def test_a_volume_over_the_containers_root_is_refused(
    fake: tuple[FakeDrivers, Path], capsys: pytest.CaptureFixture[str], volume: str
) -> None:
    """Found by the campaign: accepted, and the host directory was mounted over the
    container's root (docker refuses it: "destination can't be '/'")."""
    drivers, base = fake
    root = new_root(base)
    argv = ["--root", str(root), "run", "-v", volume, "default", "true"]
    code, err = run_cli(argv, capsys)
    assert code == 125 and "the container's / cannot be a volume" in err, err
    assert_refused(argv, code, err, root, drivers)


@pytest.mark.parametrize("verb", [["list"], ["ps"], ["state", "x"], ["run", "default", "true"]])
def test_a_state_root_that_cannot_be_a_directory_is_named(
    fake: tuple[FakeDrivers, Path], capsys: pytest.CaptureFixture[str], verb: list[str]
) -> None:
    """Found by a tester: ``--root /etc/passwd`` said only "File exists: /etc/passwd"."""
    drivers, base = fake
    blocker = base / f"file{next(_roots)}"
    blocker.write_text("not a directory\n")
    for root, reason in ((blocker, "it is not a directory"), (blocker / "x", "Not a directory")):
        code, err = run_cli(["--root", str(root), *verb], capsys)
        assert err == (
            f"pysandbox: cannot use {root} as the state root (--root): {reason}; give a "
            "directory (made if missing)\n"
        )
        assert code != 0 and drivers.events == []
    assert blocker.read_text() == "not a directory\n"


def test_an_unknown_user_names_the_image_not_its_path_in_the_store(
    fake: tuple[FakeDrivers, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a tester: ``run -u bogus default`` named the store's directory of the image."""
    drivers, base = fake
    root = new_root(base)
    argv = ["--root", str(root), "run", "-u", "bogus", "default", "true"]
    code, err = run_cli(argv, capsys)
    assert err == (
        "pysandbox: unknown user 'bogus': not in default:/etc/passwd; use a numeric "
        "UID[:GID] or a user the image defines\n"
    )
    assert_refused(argv, code, err, root, drivers)


def test_a_root_too_long_for_the_pods_sockets_is_refused_before_any_vm(
    fake: tuple[FakeDrivers, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a tester: virtiofsd failed ("Socket path too long") naming a log the rollback
    had already removed."""
    drivers, base = fake
    root = base / ("L" * 100)
    argv = ["--root", str(root), "run", "default", "true"]
    code, err = run_cli(argv, capsys)
    assert code == 125 and err.startswith(f"pysandbox: --root {str(root)[:60]}... is too long")
    assert "the limit is 107): give a state root of at most " in err
    assert_refused(argv, code, err, root, drivers)
