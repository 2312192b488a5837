"""agentapi.lazy_import: the import binds at once, the module's code runs on first use, once,
whichever thread uses it first; the process that installs it does not load importlib.abc."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentapi import lazy_import


@pytest.fixture
def lazy_module(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A module ``psb_lazy_probe`` that appends a line to a file each time its code runs."""
    name = "psb_lazy_probe"
    ran = tmp_path / "ran"
    (tmp_path / f"{name}.py").write_text(
        f"import time\nwith open({str(ran)!r}, 'a') as f:\n    f.write('x\\n')\n"
        "time.sleep(0.05)\nVALUE = 42\n"
    )
    sys.path.insert(0, str(tmp_path))
    before = list(sys.meta_path)
    try:
        lazy_import.install(frozenset({name}))
        yield name, ran
    finally:
        sys.meta_path[:] = before
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_code_runs_on_first_attribute_access_once_across_threads(
    lazy_module: tuple[str, Path],
) -> None:
    name, ran = lazy_module
    module = __import__(name)
    assert not ran.exists(), "the module's code ran at import"
    seen: list[int] = []
    threads = [threading.Thread(target=lambda: seen.append(module.VALUE)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [42] * 4
    assert ran.read_text() == "x\n", "the module's code ran more than once"
    assert sys.modules[name] is module


def test_installing_does_not_import_importlib_abc() -> None:
    # importlib.abc pulls in importlib.resources, pathlib, tempfile, ... into every small
    # process that installs lazy imports (the agent proxy, the guest agent).
    code = (
        "import sys; from agentapi import lazy_import; lazy_import.install(); "
        "print('importlib.abc' in sys.modules, 'tempfile' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out.split() == ["False", "False"]
