"""sandbox.cli.termination: SIGTERM during a start-up becomes SystemExit(143) in the main
thread, never inside a finaliser or ``__exit__`` (where Python loses it or cuts a clean-up)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from sandbox import IMPORT_ROOT


def _ignore(signals: tuple[int, ...]) -> None:
    for each in signals:
        signal.signal(each, signal.SIG_IGN)


def _run(body: str, ignored: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        """
        import os, signal, time
        from sandbox.cli import termination

        def term_now_and_wait():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs during this sleep

        termination.undo_on_termination()
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=IMPORT_ROOT,
        preexec_fn=lambda: _ignore(ignored),
    )


def test_a_signal_in_a_finaliser_stops_the_command_after_it() -> None:
    done = _run(
        """
        class Dropped:
            def __del__(self):
                term_now_and_wait()
                print("finaliser done", flush=True)

        try:
            Dropped()
            time.sleep(2)
            print("went on", flush=True)
        finally:
            print("undone", flush=True)
        """
    )
    assert (done.returncode, done.stdout, done.stderr) == (143, "finaliser done\nundone\n", "")


def test_a_signal_in_a_context_managers_exit_lets_the_clean_up_end() -> None:
    done = _run(
        """
        class Step:
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                term_now_and_wait()
                print("released", flush=True)

        try:
            with Step():
                pass
            time.sleep(2)
            print("went on", flush=True)
        finally:
            print("undone", flush=True)
        """
    )
    assert (done.returncode, done.stdout, done.stderr) == (143, "released\nundone\n", "")


def test_a_signal_elsewhere_stops_the_command_at_once() -> None:
    done = _run(
        """
        try:
            term_now_and_wait()
            print("went on", flush=True)
        finally:
            print("undone", flush=True)
        """
    )
    assert (done.returncode, done.stdout) == (143, "undone\n")


def test_a_signal_after_the_work_is_done_is_ignored() -> None:
    done = _run(
        """
        termination.finished()
        term_now_and_wait()
        print("exited with the command's status", flush=True)
        """
    )
    assert (done.returncode, done.stdout) == (0, "exited with the command's status\n")


def test_a_signal_kept_from_the_last_clean_up_is_raised_where_the_start_up_is_undone() -> None:
    done = _run(
        """
        class Step:
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                term_now_and_wait()

        try:
            with Step():
                pass
            termination.default_termination()  # before the retry came
            print("went on", flush=True)
        except SystemExit as exc:
            print("undone", exc.code, flush=True)
            raise
        """
    )
    assert (done.returncode, done.stdout) == (143, "undone 143\n")


def test_a_signal_ignored_at_start_stays_ignored() -> None:
    """``nohup`` starts the command with SIGHUP ignored: it must outlive its terminal."""
    done = _run(
        """
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.2)
        termination.finished()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        print("went on", flush=True)
        """,
        ignored=(signal.SIGHUP,),
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "went on\n", "")


def test_a_signal_while_a_class_is_made_stops_the_command_after_it() -> None:
    """A SIGTERM during an import, in a dataclass field's ``__set_name__``: Python 3.11 made
    it a RuntimeError ("Error calling __set_name__"; a create exited 1, internal error)."""
    done = _run(
        """
        class Named:
            def __set_name__(self, owner, name):
                term_now_and_wait()

        try:
            class Made:
                field = Named()
            time.sleep(2)
            print("went on", flush=True)
        finally:
            print("undone", flush=True)
        """
    )
    assert (done.returncode, done.stdout, done.stderr) == (143, "undone\n", "")
