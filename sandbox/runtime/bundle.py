"""An OCI bundle as the host reads it: config.json parsed once into a typed spec and judged
before any VM is started or joined; the pod it names.

:func:`load` reads ``<bundle>/config.json`` (at most :data:`MAX_DOCUMENT_BYTES`), decodes it and
parses it with :func:`ocispec.spec.parse_spec` -- the validation the guest's runtime runs again
on what it receives, so the guest is never the first to refuse what the host can check -- and
then checks what only the host can (:func:`check_on_host`):

- ``root.path`` (relative to the bundle or absolute) is a directory;
- every bind mount source (idem) exists;
- every hook that ``create`` runs on the host (prestart, createRuntime, createContainer:
  docs/hooks.md) is an executable file, so a missing one costs no VM;
- ``linux.resources.cpu.cpus`` / ``mems`` name only CPUs and memory nodes a pod VM has;
- a container that starts its own pod joins no other container's namespace by path (only the
  pod network's): there is no other container in a new VM.

Every refusal is a :class:`~sandbox.errors.ConfigError` that names the file and the field::

    /b/config.json: linux.resources.memory.limit: 4096 is below the minimum of 6291456 ...

Pods (design decision 1, :func:`pod_of`): a container whose annotations mark it as a CRI
sandbox boots the pod VM under the pod id from its sandbox-id annotation; containers naming
that sandbox id join it; a container without annotations is a pod of its own (pod id =
container id).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocispec.document import MAX_DOCUMENT_BYTES, decode
from ocispec.errors import SpecError
from sandbox.errors import ConfigError

if TYPE_CHECKING:
    from ocispec.spec import Resources, Spec

SANDBOX_TYPE_KEYS = ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType")
SANDBOX_ID_KEYS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")
#: Annotation of a pod's first (sandbox) container: "false" makes files the pod's guest
#: creates through the share powerless on the host (docs/security.md); default "true", as
#: runc, whose bundles' images may install setuid binaries or create device nodes.
PRIVILEGED_FILES_KEY = "org.pysandbox.privileged-files"

#: Memory nodes of a pod VM (it has one NUMA node; its CPUs: hypervisor.qemu_args.DEFAULT_CPUS).
GUEST_MEMORY_NODES = 1


class Bundle:
    """A bundle whose config.json passed :func:`load`.

    ``config`` is the decoded config.json as written: the host rewrites a copy of it into
    guest terms (``sandbox.pod.sharing``) and sends that. ``spec`` is its typed, validated
    view; host decisions are made from it. Not to be changed once made. (A plain class, not a
    dataclass: ``exec`` imports this module, and dataclasses cost it ~8 ms of start-up.)
    """

    __slots__ = ("config", "path", "spec")

    def __init__(self, path: Path, config: dict[str, Any], spec: Spec) -> None:
        self.path = path
        self.config = config
        self.spec = spec

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def rootfs(self) -> Path:
        """``root.path`` on the host (resolved against the bundle when relative)."""
        return self.path / self.spec.root_path

    def refuse(self, message: str) -> ConfigError:
        """The error for ``message`` (a field path and what is wrong) about this bundle."""
        return ConfigError(f"{self.config_path}: {message}")


def read_config(bundle: Path) -> dict[str, Any]:
    """The decoded config.json of ``bundle`` (a JSON object); ConfigError when unreadable."""
    path = bundle / "config.json"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"bundle {bundle} has no config.json") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return decode(raw, str(path))
    except SpecError as exc:
        raise ConfigError(exc.message) from None


def load(bundle: Path) -> Bundle:
    """Read, parse and validate ``bundle``'s config.json (see the module docstring); nothing
    is started or created. ConfigError naming the field when anything is wrong."""
    from ocispec.spec import parse_spec  # here: quick verbs that import this module skip it

    config = read_config(bundle)
    try:
        spec = parse_spec(config)
    except SpecError as exc:
        raise ConfigError(f"{bundle / 'config.json'}: {exc.message}") from None
    return Bundle(bundle, config, spec)


def guest_document(document: dict[str, Any], what: str) -> bytes:
    """``document`` encoded for the agent; ConfigError if it is over the size the guest takes
    (:data:`MAX_DOCUMENT_BYTES`: guest paths may be longer than the host's)."""
    import json

    data = json.dumps(document).encode()
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError(
            f"{what} is {len(data)} bytes in guest terms, more than the limit of "
            f"{MAX_DOCUMENT_BYTES}: shorten it (annotations, seccomp profile, mounts)"
        )
    return data


def check_on_host(bundle: Bundle, *, owns_pod: bool) -> None:
    """The checks of the module docstring that need the host's file system or the VM's shape.

    ``owns_pod``: the container boots its pod (so it has no pod mates to share a namespace
    with).
    """
    spec = bundle.spec
    rootfs = bundle.rootfs
    if not rootfs.is_dir():
        raise bundle.refuse(f"root.path: {rootfs} is not a directory")
    for i, mount in enumerate(spec.mounts):
        if mount.bind and not os.path.lexists(bundle.path / mount.source):
            raise bundle.refuse(f"mounts[{i}].source: {bundle.path / mount.source} does not exist")
        if mount.bind:
            why = _unshareable(bundle.path / mount.source)
            if why is not None:
                raise bundle.refuse(f"mounts[{i}].source: mount {mount.destination}: {why}")
    for kind in ("prestart", "createRuntime", "createContainer"):  # run on the host by create
        for i, hook in enumerate(spec.hooks.get(kind, ())):
            if not (os.path.isfile(hook.path) and os.access(hook.path, os.X_OK)):
                raise bundle.refuse(f"hooks.{kind}[{i}].path: {hook.path} is not an executable")
    check_guest_resources(spec.resources, "linux.resources", bundle.refuse)
    if owns_pod:
        for i, ns in enumerate(spec.namespaces):
            if ns.path is not None and ns.type != "network":
                raise bundle.refuse(
                    f"linux.namespaces[{i}].path: {ns.path} is not a namespace of this pod "
                    f"(the container starts a new pod VM: there is no {ns.type} namespace to join)"
                )


def _unshareable(source: Path) -> str | None:
    """Why the bind source ``source`` cannot be shared into the VM (it is on a host pseudo
    filesystem: /proc, /sys...; see sandbox.pod.hostfs.refuse_pseudo); None when it can, or
    when it cannot be opened (the share reports that, as before)."""
    from sandbox.pod import hostfs

    try:
        fd = hostfs.open_source(source)
    except OSError:
        return None
    try:
        return hostfs.refuse_pseudo(fd, source)
    except OSError:
        return None
    finally:
        os.close(fd)


def check_guest_resources(
    resources: Resources | None, where: str, refuse: Callable[[str], Exception]
) -> None:
    """Refuse cpuset lists naming CPUs or memory nodes a pod VM does not have.

    ``where`` is the field path of ``resources`` (``linux.resources``); ``refuse(message)``
    returns the exception to raise.
    """
    if resources is None or (resources.cpus is None and resources.mems is None):
        return
    from hypervisor.qemu_args import DEFAULT_CPUS  # here: most bundles name no cpuset

    for field, highest, count, what in (
        ("cpus", resources.cpus, DEFAULT_CPUS, "CPU"),
        ("mems", resources.mems, GUEST_MEMORY_NODES, "memory node"),
    ):
        if highest is not None and highest >= count:
            raise refuse(
                f"{where}.cpu.{field}: names {what} {highest}, but a pod VM has "
                f"{count} {what}{'s' if count > 1 else ''} (numbered from 0)"
            )


def pod_of(container_id: str, annotations: dict[str, str]) -> tuple[str, bool]:
    """(pod id, whether this container owns the pod) from the CRI annotations."""
    kind = next((annotations[k] for k in SANDBOX_TYPE_KEYS if k in annotations), None)
    sandbox_id = next((annotations[k] for k in SANDBOX_ID_KEYS if k in annotations), None)
    if kind == "sandbox" or sandbox_id is None:
        return container_id if sandbox_id is None else str(sandbox_id), True
    return str(sandbox_id), False


def is_cri_sandbox(annotations: dict[str, str]) -> bool:
    """Whether the container is a CRI pod's sandbox (pause) container: it stands for the pod
    and asks for no resources of its own (its limits do not count in the pod's)."""
    kind = next((annotations[k] for k in SANDBOX_TYPE_KEYS if k in annotations), None)
    return kind == "sandbox"


def privileged_files(annotations: dict[str, str]) -> bool:
    """The :data:`PRIVILEGED_FILES_KEY` annotation; ConfigError unless it is absent (True),
    "true" or "false"."""
    value = annotations.get(PRIVILEGED_FILES_KEY, "true")
    if value not in ("true", "false"):
        raise ConfigError(f"annotation {PRIVILEGED_FILES_KEY} must be 'true' or 'false'")
    return bool(value == "true")
