"""``pysandbox run``'s process.args: docker's ENTRYPOINT/CMD rules, and ``--entrypoint`` as
parsed from a real command line (options before IMAGE, everything after it is the command)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sandbox.cli.main import build_parser
from sandbox.errors import RunError
from sandbox.run.spec import check_options, hostname, process_args, run_name

# An image with ENTRYPOINT ["/bin/sh","-c","echo ep: \"$0\" \"$@\""] and CMD ["c1","c2"].
EP = ["/bin/sh", "-c", 'echo ep: "$0" "$@"']
CMD = ["c1", "c2"]


def args_of(*argv: str, entrypoint: list[str] = EP, cmd: list[str] = CMD) -> list[str]:
    parsed = build_parser().parse_args(["run", *argv])
    assert parsed.image == "img"
    return process_args(parsed.command, parsed.entrypoint, entrypoint, cmd)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["img"], [*EP, "c1", "c2"]),  # entrypoint + image Cmd
        (["img", "x", "y"], [*EP, "x", "y"]),  # the command replaces Cmd only
        (["img", "--", "x"], [*EP, "x"]),
        (["img", "--"], [*EP, "c1", "c2"]),
        (["img", "--entrypoint", "z"], [*EP, "--entrypoint", "z"]),  # after IMAGE: the command's
        (["--entrypoint", "/bin/echo", "img"], ["/bin/echo"]),  # image Cmd dropped
        (["--entrypoint", "/bin/echo", "img", "a", "b"], ["/bin/echo", "a", "b"]),
        (["--entrypoint", "/bin/echo x", "img"], ["/bin/echo x"]),  # one word, never split
        (["--entrypoint=", "img", "echo", "hi"], ["echo", "hi"]),  # cleared
        (["--entrypoint", "", "img", "echo", "hi"], ["echo", "hi"]),
    ],
)
def test_entrypoint_and_cmd_combine_as_docker_does(argv: list[str], expected: list[str]) -> None:
    assert args_of(*argv) == expected


def test_an_image_without_entrypoint_runs_its_cmd_or_the_command() -> None:
    assert args_of("img", entrypoint=[]) == ["c1", "c2"]
    assert args_of("img", "ls", "-l", entrypoint=[]) == ["ls", "-l"]
    assert args_of("img", cmd=[]) == EP


@pytest.mark.parametrize(
    ("argv", "entrypoint", "cmd", "message"),
    [
        (["img"], [], [], "no command to run: give one after IMAGE"),
        (["img", "--"], [], [], "no command to run: give one after IMAGE"),
        # podman (and docker) refuse this too: '' clears the entrypoint and drops Cmd
        (["--entrypoint=", "img"], EP, CMD, "--entrypoint '' drops the image's Cmd"),
    ],
)
def test_nothing_to_run_is_one_clear_error(
    argv: list[str], entrypoint: list[str], cmd: list[str], message: str
) -> None:
    with pytest.raises(RunError, match=message) as raised:
        args_of(*argv, entrypoint=entrypoint, cmd=cmd)
    assert "\n" not in str(raised.value)


def test_env_file_lines_are_read_as_docker_reads_them(tmp_path: Path) -> None:
    """docker (opts/file.go): leading blanks dropped, blank lines and comments skipped, the
    value kept as written (inner and trailing blanks too), a bare NAME taken from the
    caller's environment."""
    from sandbox.run.spec import _env

    env_file = tmp_path / "env"
    env_file.write_text(
        "  A=1\n\t# indented comment\n   \nB=two words \nC==x\nHOME\nUNSET_PSB_VAR\n"
    )
    args = build_parser().parse_args(["run", "--env-file", str(env_file), "default", "true"])
    got = _env(args, ["PATH=/bin"])
    assert got == ["PATH=/bin", "A=1", "B=two words ", "C==x", f"HOME={os.environ['HOME']}"]


@pytest.mark.parametrize(
    ("text", "number"),
    [("", 15), ("SIGINT", 2), ("quit", 3), ("SIGUSR1", 10), ("9", 9), (" SIGWINCH ", 28)],
)
def test_stop_signal_read_as_docker_reads_it(text: str, number: int) -> None:
    from sandbox.run.detached import parse_stop_signal

    assert parse_stop_signal(text) == number


@pytest.mark.parametrize("text", ["SIGNOPE", "0", "99", "-1"])
def test_a_bad_stop_signal_is_one_clear_error(text: str) -> None:
    from sandbox.run.detached import parse_stop_signal

    with pytest.raises(RunError, match=r"invalid STOPSIGNAL .* in the image: name a signal"):
        parse_stop_signal(text)


@pytest.mark.parametrize(
    "argv", [["img", ""], ["--entrypoint", "", "img", ""], ["--entrypoint=", "img", "", "x"]]
)
def test_an_empty_program_is_not_found_127_as_in_docker(argv: list[str]) -> None:
    """``docker run IMAGE ''`` (and podman with runc): exit 127, runc's 'executable file not
    found', not a refusal of the spec (125)."""
    with pytest.raises(RunError) as raised:
        args_of(*argv, entrypoint=[])
    assert raised.value.exit_code == 127
    assert str(raised.value) == 'exec: "": executable file not found in $PATH'


@pytest.mark.parametrize(
    ("argv", "generated", "expected"),
    [
        (["img"], "run-0123456789ab", "0123456789ab"),  # docker's: the short id
        (["--name", "web", "img"], "web", "web"),
        (["--name", "web", "--hostname", "h1", "img"], "web", "h1"),
        (["-h", "h2", "img"], "run-0123456789ab", "h2"),  # docker's -h
    ],
)
def test_hostname_is_the_short_id_the_name_or_hostname(
    argv: list[str], generated: str, expected: str
) -> None:
    parsed = build_parser().parse_args(["run", *argv])
    assert hostname(parsed, generated) == expected


def test_run_name_is_run_and_twelve_hex_digits_unless_named() -> None:
    name = run_name(build_parser().parse_args(["run", "img"]))
    assert re.fullmatch(r"run-[0-9a-f]{12}", name), name
    assert run_name(build_parser().parse_args(["run", "--name", "x", "img"])) == "x"


@pytest.mark.parametrize("bad", ["a b", "-x", "a\nb", "x" * 65, "a/b", ""])
def test_a_bad_hostname_is_refused_in_one_line(bad: str) -> None:
    parsed = build_parser().parse_args(["run", f"--hostname={bad}", "img"])
    if bad == "":
        check_options(parsed)  # '' is docker's default: none given
        return
    with pytest.raises(RunError, match=r"^invalid --hostname ") as raised:
        check_options(parsed)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("data", "lines", "expected"),
    [
        (b"a\nb\nc\n", 1, b"c\n"),
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc\n", 9, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 0, b""),
        (b"a\nb\nc", 1, b"c"),  # a last line without its newline counts
        (b"a\nb\nc", 2, b"b\nc"),
        (b"", 3, b""),
        (b"\n\n", 1, b"\n"),
    ],
)
def test_logs_tail_takes_the_last_lines(
    tmp_path: Path, data: bytes, lines: int, expected: bytes
) -> None:
    from sandbox.run.detached import _tail_offset

    path = tmp_path / "log"
    path.write_bytes(data)
    for block in (1, 2, 65536):  # lines across block edges too
        with path.open("rb") as log:
            log.seek(_tail_offset(log, lines, block))
            assert log.read() == expected, block


@pytest.mark.parametrize(
    ("flags", "swap"),
    [
        ([], None),
        (["--memory", "64m"], 128 * 2**20),  # docker: twice --memory
        (["--memory", "64m", "--memory-swap", "100m"], 100 * 2**20),
        (["--memory", "64m", "--memory-swap", "64m"], 64 * 2**20),  # no swap
        (["--memory", "64m", "--memory-swap", "-1"], -1),  # unlimited swap
    ],
)
def test_memory_swap_is_memory_and_swap_together_as_docker_sets_it(
    flags: list[str], swap: int | None
) -> None:
    from sandbox.run.spec import memory_swap

    args = build_parser().parse_args(["run", *flags, "default", "true"])
    assert memory_swap(args) == swap


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--memory-swap", "1g"], "invalid --memory-swap 1g: it needs --memory"),
        (["--memory", "64m", "--memory-swap", "32m"], "invalid --memory-swap 32m: below --memory"),
        (["--memory", "64m", "--memory-swap", "lots"], "invalid size 'lots'"),
    ],
)
def test_a_bad_memory_swap_is_one_clear_error(flags: list[str], says: str) -> None:
    args = build_parser().parse_args(["run", *flags, "default", "true"])
    with pytest.raises(RunError, match=re.escape(says)):
        check_options(args)


def test_ulimits_are_read_as_docker_reads_them() -> None:
    from sandbox.run.spec import ulimits

    assert ulimits(["nofile=1024:4096", "core=-1", "nproc=5", "nofile=10"]) == {
        "RLIMIT_NOFILE": (10, 10),  # a later one wins; HARD defaults to SOFT
        "RLIMIT_CORE": ((1 << 64) - 1, (1 << 64) - 1),
        "RLIMIT_NPROC": (5, 5),
    }


@pytest.mark.parametrize(
    "item", ["bogus=1", "nofile", "nofile=", "nofile=x", "nofile=9:3", "core=-2"]
)
def test_a_bad_ulimit_is_one_clear_error(item: str) -> None:
    args = build_parser().parse_args(["run", "--ulimit", item, "default", "true"])
    with pytest.raises(RunError, match=r"^invalid --ulimit .* NAME=SOFT\[:HARD\]"):
        check_options(args)
