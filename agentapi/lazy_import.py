"""Lazy imports: the ``import`` binds the module at once, its code runs on first attribute
access. Whoever uses such a module gets it fully loaded; nobody pays for it when nobody uses it.

Used where start-up time counts: the guest agent (guest-image/agent_launcher.py) and the
``pysandbox`` command line (sandbox/cli/main.py); and where memory does: the per-pod agent
proxy on the host (sandbox/pod/agent_proxy.py: ~1.6 MiB of its own pages) and the guest
agent (both :data:`PROXY_LAZY_MODULES`). Why :data:`LAZY_MODULES`:
``grpc/__init__.py`` always ends with ``from grpc import aio`` and ``grpc._cython.cygrpc``
imports ``asyncio`` at load, but synchronous gRPC clients and servers never touch either;
``protobuf``'s ``descriptor_pool`` imports the pure-Python message implementation (and through
it ``text_format``) even when the ``upb`` C implementation is in use. Measured in
docs/performance.md (guest: ~0.3 s under TCG; host CLI: ~30 ms of CPU).

The lazy loader is CPython 3.12's thread-safe ``importlib.util.LazyLoader`` (3.11's can let
a second thread see a half-initialised module).
"""

from __future__ import annotations

import sys
import threading
import types
from importlib.machinery import ModuleSpec, PathFinder
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.abc import Loader
else:
    # importlib.abc imports importlib.resources, pathlib, tempfile, ... (~16 ms, ~1 MiB of a
    # small process): the import system needs only create_module and exec_module.
    Loader = object

#: Modules imported lazily once :func:`install` ran (see the module docstring).
LAZY_MODULES = frozenset(
    {
        "asyncio",
        "grpc.aio",
        "google.protobuf.internal.python_message",
        "google.protobuf.text_format",
    }
)

#: What the per-pod agent proxy (sandbox/pod/agent_proxy.py) and the guest agent
#: (guest-image/agent_launcher.py), both serving gRPC with h2, import lazily: protobuf's two
#: modules as above, and ``inspect``, which ``dataclasses`` imports (for h2's event classes)
#: but uses only for a class without a docstring (~0.8 MiB of the proxy's own pages).
PROXY_LAZY_MODULES = frozenset(
    {
        "google.protobuf.internal.python_message",
        "google.protobuf.text_format",
        "inspect",
    }
)


class _LazyModule(types.ModuleType):
    """A module whose code runs on first attribute access (CPython 3.12 semantics)."""

    def __getattribute__(self, attr: str) -> Any:
        spec = object.__getattribute__(self, "__spec__")
        state = spec.loader_state
        with state["lock"]:
            # The first thread to take the lock loads the module and resets its class;
            # the others wait here and then use the loaded module.
            if object.__getattribute__(self, "__class__") is _LazyModule:
                cls = state["__class__"]
                # Re-entrant access from the loading thread (the module's own code, its
                # submodule imports) sees the module as it is so far.
                if state["is_loading"]:
                    return cls.__getattribute__(self, attr)
                state["is_loading"] = True
                namespace = cls.__getattribute__(self, "__dict__")
                then = state["__dict__"]
                updated = {
                    key: value
                    for key, value in namespace.items()
                    if key not in then or then[key] is not value
                }
                spec.loader.exec_module(self)
                name = spec.name
                if name in sys.modules and sys.modules[name] is not self:
                    raise ValueError(f"module object for {name!r} substituted in sys.modules")
                namespace.update(updated)
                self.__class__ = cls
        return getattr(self, attr)

    def __delattr__(self, attr: str) -> None:
        self.__getattribute__("__class__")
        delattr(self, attr)


class _LazyLoader(Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        spec = module.__spec__
        assert spec is not None
        spec.loader = self.loader
        module.__loader__ = self.loader
        spec.loader_state = {
            "__dict__": module.__dict__.copy(),
            "__class__": module.__class__,
            "lock": threading.RLock(),
            "is_loading": False,
        }
        module.__class__ = _LazyModule


class _LazyFinder:
    """Meta path finder: the normal spec for a module of ``names``, with a lazy loader."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, name: str, path: Any = None, target: types.ModuleType | None = None
    ) -> ModuleSpec | None:
        if name not in self.names:
            return None
        spec = PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LazyLoader(spec.loader)
        return spec


def install(names: frozenset[str] = LAZY_MODULES) -> None:
    """Import ``names`` lazily from now on in this process."""
    sys.meta_path.insert(0, _LazyFinder(names))
