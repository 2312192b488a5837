"""What a VM cannot give a container, judged from config.json on the host before a VM boots.

Host namespaces. runc leaves a container in the runtime's own namespace of every type that
``linux.namespaces`` does not list (runtime spec, config-linux.md "Namespaces": "If a
namespace type is not specified in the namespaces array, the container MUST inherit the
runtime namespace of that type"). That is how clients ask for the node's namespaces:

- containerd 1.6 (CRI, ``pkg/cri/server/sandbox_run_linux.go``) drops ``network`` and ``uts``
  from the sandbox spec for ``hostNetwork``, ``pid`` for ``hostPID`` and ``ipc`` for
  ``hostIPC``; its app containers always join the sandbox's by ``/proc/<pid>/ns/...`` path
  (``WithPodNamespaces``), so a host-namespace pod is seen at RunPodSandbox;
- podman 4.3 drops the entry for ``--network host``, ``--ipc host``, ``--pid host`` and
  ``--uts host`` (observed: the config.json conmon hands the runtime);
- ``ctr run --net-host`` drops ``network``; CRI-O drops the entries as containerd does.

Inside a pod VM "the runtime's namespace" is the guest's, not the node's: a hostNetwork pod
would get a network of its own with no interface of the node's, and an ``ipc: NODE``
container the guest's IPC objects. A VM cannot share the node's kernel namespaces at all, so
:func:`refuse_host_namespaces` refuses such a spec, for the pod's sandbox and for any
container joining a pod, with one line naming the client option.
``pysandbox run --network user`` drops the network entry of its own spec on purpose (the
guest's root network namespace is the slirp NIC's); it never comes through here.

Mount propagation. A mount with ``shared``/``rshared`` (Kubernetes ``Bidirectional``; the
CRI plugin also sets ``linux.rootfsPropagation: rshared``) asks that mounts made in the
container below it appear on the host. Host to container works (the volume's clone in the
pod's share is a slave of its source: sandbox/pod/hostfs.py ``bind_into``); container to host
cannot cross the VM: those mounts live in the guest kernel. :func:`propagation_warnings` names each
such mount; ``create`` logs them as warnings and carries on, as the mount still works inside
the pod (docs/kubernetes.md).
"""

from __future__ import annotations

from typing import Any

from sandbox.errors import ConfigError

#: Namespace types a VM cannot share with the node, with the client option that asks for it:
#: (Kubernetes pod field, podman flag).
HOST_NAMESPACE_OPTIONS: dict[str, tuple[str, str]] = {
    "network": ("hostNetwork", "--network host"),
    "ipc": ("hostIPC", "--ipc host"),
    "pid": ("hostPID", "--pid host"),
    "uts": ("hostNetwork", "--uts host"),
}
_NAMES = {"network": "network", "ipc": "IPC", "pid": "PID", "uts": "UTS"}
#: Mount options (and rootfsPropagation values) that propagate container mounts to the host.
_TO_HOST = frozenset({"shared", "rshared"})


def host_namespaces(spec: dict[str, Any]) -> list[str]:
    """The types of :data:`HOST_NAMESPACE_OPTIONS` that ``linux.namespaces`` does not list
    (so runc would leave the container in the node's), in that table's order.

    An entry with a ``path`` counts as listed: paths are checked where they are joined
    (:mod:`sandbox.pod.sharing`). Malformed ``linux``/``namespaces`` values count as absent
    lists only when they are missing; other shapes are left to the spec validation.
    """
    linux = spec.get("linux")
    entries = linux.get("namespaces") if isinstance(linux, dict) else None
    listed = {
        entry.get("type")
        for entry in (entries if isinstance(entries, list) else [])
        if isinstance(entry, dict)
    }
    return [kind for kind in HOST_NAMESPACE_OPTIONS if kind not in listed]


def refuse_host_namespaces(spec: dict[str, Any]) -> None:
    """Raise ConfigError when the container would share a namespace of the node.

    The message names the namespaces, the spec field and the options that ask for them, e.g.
    ``hostNetwork cannot be VM-isolated: config.json shares the node's network and UTS
    namespaces (linux.namespaces lists no "network", "uts"; Kubernetes hostNetwork, podman
    --network host, --uts host), which a VM cannot give a container; run it with runc or give
    it its own network and UTS namespaces``.
    """
    missing = host_namespaces(spec)
    if not missing:
        return
    kube = list(dict.fromkeys(HOST_NAMESPACE_OPTIONS[kind][0] for kind in missing))
    podman = [HOST_NAMESPACE_OPTIONS[kind][1] for kind in missing]
    names = [_NAMES[kind] for kind in missing]
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    plural = "namespace" if len(names) == 1 else "namespaces"
    entries = ", ".join(f'"{kind}"' for kind in missing)
    raise ConfigError(
        f"{'/'.join(kube)} cannot be VM-isolated: config.json shares the node's {what} "
        f"{plural} (linux.namespaces lists no {entries}; Kubernetes {', '.join(kube)}, "
        f"podman {', '.join(podman)}), which a VM cannot give a container; run it with runc "
        f"or give it its own {what} {plural}"
    )


def propagation_warnings(spec: dict[str, Any]) -> list[str]:
    """One warning per mount whose propagation asks to reach the host (``shared``/``rshared``),
    and one for ``linux.rootfsPropagation`` of that kind when no mount has it; [] when none.

    Each names the mount's destination and says what still works.
    """
    warnings = []
    for mount in spec.get("mounts") or []:
        if not isinstance(mount, dict):
            continue
        options = mount.get("options") or []
        asked = [o for o in options if isinstance(o, str) and o in _TO_HOST]
        if asked:
            warnings.append(
                f"mount {mount.get('destination')}: {asked[0]} propagation (Kubernetes "
                "Bidirectional) cannot cross the VM: mounts made below it in the container "
                "stay in the pod's VM and do not reach the host; host mounts still reach the "
                "container"
            )
    linux = spec.get("linux")
    rootfs = linux.get("rootfsPropagation") if isinstance(linux, dict) else None
    if rootfs in _TO_HOST and not warnings:
        warnings.append(
            f"linux.rootfsPropagation {rootfs} cannot cross the VM: mounts made in the "
            "container stay in the pod's VM and do not reach the host"
        )
    return warnings
