"""The host's error tree: fields survive re-wrapping and decide the exit status."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from sandbox.errors import (
    AgentError,
    AgentTimeout,
    CommandError,
    FailureReason,
    SandboxError,
    describe,
)


def test_command_error_exit_status_comes_from_its_reason() -> None:
    fields = {"rpc": "ExecProcess", "container_id": "c1", "exec_id": "e1", "pod_id": "p"}
    missing = CommandError(
        "agent ExecProcess failed: x", reason=FailureReason.EXECUTABLE_NOT_FOUND, **fields
    )
    denied = CommandError(
        "agent ExecProcess failed: y", reason=FailureReason.NOT_EXECUTABLE, **fields
    )
    assert describe(missing) == ("agent ExecProcess failed: x", 127)
    assert describe(denied) == ("agent ExecProcess failed: y", 126)
    assert describe(
        AgentError("agent ExecProcess failed: z", reason=FailureReason.SETUP_FAILED)
    ) == (
        "agent ExecProcess failed: z",
        1,
    )
    with pytest.raises(ValueError, match="INVALID_SPEC"):
        CommandError("no", reason=FailureReason.INVALID_SPEC)


def test_amended_keeps_the_class_and_every_field() -> None:
    error = CommandError(
        "agent CreateContainer failed: nope",
        reason=FailureReason.NOT_EXECUTABLE,
        rpc="CreateContainer",
        code="FAILED_PRECONDITION",
        detail="nope",
        pod_id="p1",
        container_id="c1",
    )
    amended = error.amended("serial console log kept at /tmp/x")
    assert type(amended) is CommandError and amended is not error
    assert str(amended) == "agent CreateContainer failed: nope; serial console log kept at /tmp/x"
    assert vars(amended) == vars(error)
    assert str(error) == "agent CreateContainer failed: nope"
    timeout = AgentTimeout("agent did not answer Health within 1s", rpc="Health").amended("x")
    assert isinstance(timeout, AgentTimeout) and timeout.rpc == "Health"


def test_every_host_error_class_is_drawn_in_the_tree() -> None:
    """Every SandboxError subclass of every sandbox module is defined in sandbox.errors and
    named in its docstring's tree; any other exception class is named there as translated."""
    import sandbox
    import sandbox.errors as errors

    defined: set[type[BaseException]] = set()
    for info in pkgutil.walk_packages(sandbox.__path__, "sandbox."):
        if not info.name.endswith("__main__"):
            module = importlib.import_module(info.name)
            defined |= {
                obj
                for obj in vars(module).values()
                if isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("sandbox")
            }

    def subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    assert errors.__doc__ is not None
    classes = subclasses(SandboxError) | {SandboxError}
    assert len(classes) >= 12
    for cls in defined - classes:  # outside the tree: the docstring says where it is translated
        assert f"``{cls.__module__}.{cls.__name__}``" in errors.__doc__, cls
    for cls in classes:
        assert cls.__module__ == "sandbox.errors", cls
        assert f" {cls.__name__} " in errors.__doc__, cls
