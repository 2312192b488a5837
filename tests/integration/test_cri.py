"""The Kubernetes path: a kubelet-like client drives containerd's CRI API with the ``pysandbox``
runtime handler, and the whole pod runs in one VM.

The CRI messages come from tests/integration/cri/cri_subset.proto (our own subset of
k8s.io/cri-api runtime/v1, same package and field numbers); the stubs are generated into a
temporary directory here, never committed. Pods get a pod network from a CNI bridge in a
network namespace of the test's; pods asking for the node's namespaces are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from sandbox.pod.hostfs import mounts_below
from tests.integration import containerd_env, cri_stubs, ws_portforward
from tests.integration.containerd_env import HANDLER, IMAGE, Containerd
from tests.integration.pods import PodFactory
from tests.processes import processes_mentioning, wait_until

CRI_NAMESPACE = "k8s.io"
POD_SUBNET = "10.250.77.0/24"
GATEWAY = "10.250.77.1"  # the containerd namespace of the CRI plugin
# `<RFC 3339 time> <stream> <P|F> <text>`: the CRI container log format.
CRI_LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) ([PF]) (.*)$")


@dataclass
class Cri:
    """CRI stubs bound to a private containerd."""

    pb: Any
    runtime: Any
    images: Any
    daemon: Containerd
    log_dir: Path
    netns: str  # containerd's network namespace: the "node" network and the CNI bridge

    @property
    def runtime_root(self) -> Path:
        """The runtime's --root for the CRI namespace."""
        return self.daemon.runtime_root / CRI_NAMESPACE


@pytest.fixture(scope="module")
def cri(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    module_pods: PodFactory,
) -> Iterator[Cri]:
    """A private containerd and CRI stubs talking to it over its socket.

    containerd runs in a network namespace of the test's: the "node" network of host-network
    pods, and where the CNI bridge for pod networks is set up (the host's is never touched).
    """
    pb, pb_grpc = cri_stubs.generate(tmp_path_factory.mktemp("cri-stubs"))
    with (
        containerd_env.network_namespace() as netns,
        containerd_env.running(
            lambda: request.session.testsfailed > 0, netns=netns, cni_subnet=POD_SUBNET
        ) as daemon,
    ):
        module_pods.watch(daemon.runtime_root)  # logs of its pods kept when a test fails
        channel = grpc.insecure_channel(f"unix://{daemon.address}")
        try:
            yield Cri(
                pb,
                pb_grpc.RuntimeServiceStub(channel),
                pb_grpc.ImageServiceStub(channel),
                daemon,
                tmp_path_factory.mktemp("pod-logs"),
                netns,
            )
        finally:
            channel.close()


def _pod_config(
    cri: Cri, name: str, network: int | None = None, pid: int | None = None, ipc: int | None = None
) -> Any:
    pb = cri.pb
    network = pb.POD if network is None else network
    pid = pb.CONTAINER if pid is None else pid
    ipc = pb.POD if ipc is None else ipc
    uid = uuid.uuid4().hex
    log_dir = cri.log_dir / f"default_{name}_{uid}"
    log_dir.mkdir()
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
        hostname=name if network == pb.POD else "",  # kubelet: none with the node's network
        log_directory=str(log_dir),
        labels={"app": name},
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=f"/pysandbox-test/pod{uid}",
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=network, pid=pid, ipc=ipc)
            ),
        ),
    )


def _container_config(
    cri: Cri, name: str, script: str, network: int | None = None, pid: int | None = None
) -> Any:
    """``sh -c script`` in the busybox image; its own pid namespace unless ``pid`` (a CRI
    NamespaceMode: POD shares the sandbox's, as kubelet's shareProcessNamespace does)."""
    pb = cri.pb
    network = pb.POD if network is None else network
    pid = pb.CONTAINER if pid is None else pid
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=IMAGE),
        command=["sh", "-c", script],
        envs=[pb.KeyValue(key="CONTAINER", value=name)],
        log_path=f"{name}/0.log",
        linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(
                namespace_options=pb.NamespaceOption(network=network, pid=pid, ipc=pb.POD)
            )
        ),
    )


def _status(cri: Cri, cid: str) -> Any:
    return cri.runtime.ContainerStatus(
        cri.pb.ContainerStatusRequest(container_id=cid), timeout=30
    ).status


def _wait_exited(cri: Cri, cid: str, timeout: float = 60) -> Any:
    """The status of ``cid`` once it has exited."""
    exited = cri.pb.CONTAINER_EXITED
    assert wait_until(lambda: _status(cri, cid).state == exited, timeout), _status(cri, cid)
    return _status(cri, cid)


def _exec(cri: Cri, cid: str, *cmd: str) -> Any:
    return cri.runtime.ExecSync(
        cri.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=60), timeout=90
    )


def _log_lines(path: Path) -> list[tuple[str, str, str]]:
    """(stream, tag, text) of every line of a CRI log file, checking the format."""
    lines = []
    for line in path.read_text().splitlines():
        match = CRI_LOG_LINE.match(line)
        assert match, f"not a CRI log line: {line!r}"
        stamp, stream, tag, text = match.groups()
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp), line
        lines.append((stream, tag, text))
    return lines


def _qemu_processes(root: Path) -> list[str]:
    return [p for p in processes_mentioning(str(root)) if "qemu-system" in p]


def test_cri_version_and_images(cri: Cri) -> None:
    version = cri.runtime.Version(cri.pb.VersionRequest(version="v1"), timeout=30)
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version.startswith("v1")
    for image in (IMAGE, containerd_env.PAUSE_IMAGE):
        found = cri.images.ImageStatus(
            cri.pb.ImageStatusRequest(image=cri.pb.ImageSpec(image=image)), timeout=30
        ).image
        assert image in found.repo_tags, found


def test_pod_with_containers_in_one_vm(cri: Cri) -> None:
    """RunPodSandbox, three containers, ExecSync, status, logs, update, stop, remove."""
    pb, rt = cri.pb, cri.runtime
    config = _pod_config(cri, "onevm")
    started = time.monotonic()
    pod_id = rt.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=180
    ).pod_sandbox_id
    boot_seconds = time.monotonic() - started
    removed = False
    try:
        status = rt.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30
        ).status
        assert status.state == pb.SANDBOX_READY
        assert status.runtime_handler == HANDLER
        # The sandbox (pause) container booted the pod's VM: one pod dir, one QEMU.
        assert len(list((cri.runtime_root / "p").glob("*"))) == 1
        assert len(_qemu_processes(cri.runtime_root)) == 1

        ids: dict[str, str] = {}
        scripts = {
            "app": "echo app-started; echo app-err >&2; exec sleep 1000",
            "ok": "cat /proc/sys/kernel/random/boot_id; echo $CONTAINER; exit 0",
            "fail": "echo failing; exit 3",
        }
        for name, script in scripts.items():
            ids[name] = rt.CreateContainer(
                pb.CreateContainerRequest(
                    pod_sandbox_id=pod_id,
                    config=_container_config(cri, name, script),
                    sandbox_config=config,
                ),
                timeout=120,
            ).container_id
            assert _status(cri, ids[name]).state == pb.CONTAINER_CREATED
            rt.StartContainer(pb.StartContainerRequest(container_id=ids[name]), timeout=120)

        assert _status(cri, ids["app"]).state == pb.CONTAINER_RUNNING
        for name, code in (("ok", 0), ("fail", 3)):
            final = _wait_exited(cri, ids[name])
            assert (final.exit_code, final.reason) == (code, "Completed" if code == 0 else "Error")
            # Not finished_at >= started_at: containerd takes started_at when `start` returns,
            # after the guest process may already have exited (a fast container, as with runc).
            assert final.started_at > 0 and final.finished_at > 0

        # ExecSync: stdout, stderr and the exit code come back.
        done = _exec(cri, ids["app"], "sh", "-c", "echo out-$CONTAINER; echo err >&2; exit 2")
        assert (done.stdout, done.stderr, done.exit_code) == (b"out-app\n", b"err\n", 2)

        # /dev/shm is the pod's: containerd's sandbox shm (a host tmpfs named shm, 64 MiB)
        # is one tmpfs in the guest for all the pod's containers, as under runc the host
        # one is: what the app container writes there, the sandbox container reads.
        shm = _exec(
            cri, ids["app"], "sh", "-c", "echo from-app > /dev/shm/f; stat -f -c %T /dev/shm"
        )
        assert (shm.stdout, shm.exit_code) == (b"tmpfs\n", 0), shm
        mounts = _exec(cri, ids["app"], "grep", " /dev/shm ", "/proc/mounts").stdout.decode()
        assert mounts.startswith("shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size=65536k")
        cat = ["exec", pod_id, "cat", "/dev/shm/f"]
        read = subprocess.run(
            [containerd_env.RUNTIME, "--root", str(cri.runtime_root), *cat],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (read.returncode, read.stdout) == (0, "from-app\n"), read.stderr

        # Same guest kernel (boot id) in every container; still one VM for the whole pod.
        app_boot = _exec(cri, ids["app"], "cat", "/proc/sys/kernel/random/boot_id").stdout
        log_dir = Path(config.log_directory)
        ok_lines = _log_lines(log_dir / "ok" / "0.log")
        assert [text for _, _, text in ok_lines] == [app_boot.decode().strip(), "ok"]
        assert len(list((cri.runtime_root / "p").glob("*"))) == 1
        assert len(_qemu_processes(cri.runtime_root)) == 1

        # Container logs in CRI format, both streams, full lines.
        app_lines = _log_lines(log_dir / "app" / "0.log")
        assert ("stdout", "F", "app-started") in app_lines
        assert ("stderr", "F", "app-err") in app_lines
        assert _log_lines(log_dir / "fail" / "0.log") == [("stdout", "F", "failing")]

        # UpdateContainerResources reaches the container's cgroup in the guest.
        rt.UpdateContainerResources(
            pb.UpdateContainerResourcesRequest(
                container_id=ids["app"],
                linux=pb.LinuxContainerResources(memory_limit_in_bytes=64 * 2**20),
            ),
            timeout=60,
        )
        limit = _exec(
            cri,
            ids["app"],
            "sh",
            "-c",
            "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
        )
        assert limit.stdout.decode().strip() == str(64 * 2**20), limit

        # StopContainer: sleep as PID 1 ignores SIGTERM, so the grace period ends in SIGKILL.
        rt.StopContainer(pb.StopContainerRequest(container_id=ids["app"], timeout=2), timeout=60)
        stopped = _status(cri, ids["app"])
        assert (stopped.state, stopped.exit_code) == (pb.CONTAINER_EXITED, 137)

        _stop_with_a_child_holding_stdout(cri, pod_id, config, ids)

        for name in ("app", "ok"):  # "fail" and "bg" are left to RemovePodSandbox
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=ids[name]), timeout=60)
        listed = rt.ListContainers(
            pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod_id)), timeout=30
        )
        assert sorted(c.id for c in listed.containers) == sorted([ids["fail"], ids["bg"]])

        # Stopping and removing a pod whose containers' processes ended succeeds (containerd
        # takes runc's "container not running" from kill to mean "already finished").
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        removed = True
        listed = rt.ListContainers(
            pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod_id)), timeout=30
        )
        assert list(listed.containers) == []
    finally:
        if not removed:
            for call, req in (
                (rt.StopPodSandbox, pb.StopPodSandboxRequest),
                (rt.RemovePodSandbox, pb.RemovePodSandboxRequest),
            ):
                try:
                    call(req(pod_sandbox_id=pod_id), timeout=120)
                except grpc.RpcError as exc:
                    print(f"cleanup of pod {pod_id}: {exc}")
    _assert_pod_gone(cri, pod_id)
    print(f"\nRunPodSandbox took {boot_seconds:.1f}s")


def _stop_with_a_child_holding_stdout(
    cri: Cri, pod_id: str, config: Any, ids: dict[str, str]
) -> None:
    """A container in the pod's pid namespace whose init leaves a child holding its stdout
    (``crictl stop -t 0``): the stop returns as soon as the init is gone (runc: 0.1 s; it
    took 60 s when the shim waited for the output's EOF), with status 137, and the child is
    killed too (containerd's ``kill --all`` once such an init exits, as with runc)."""
    pb, rt = cri.pb, cri.runtime
    ids["bg"] = rt.CreateContainer(
        pb.CreateContainerRequest(
            pod_sandbox_id=pod_id,
            config=_container_config(cri, "bg", "sleep 1000 & exec sleep 2000", pid=pb.POD),
            sandbox_config=config,
        ),
        timeout=120,
    ).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=ids["bg"]), timeout=120)

    def pod_processes() -> list[str]:
        """The live processes of the pod's pid namespace (ps in the sandbox container)."""
        ps = ["exec", pod_id, "ps", "-o", "stat,args"]
        done = subprocess.run(
            [containerd_env.RUNTIME, "--root", str(cri.runtime_root), *ps],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return [line[5:] for line in done.stdout.splitlines()[1:] if not line.startswith("Z")]

    assert wait_until(lambda: "sleep 1000" in pod_processes(), 60), pod_processes()
    assert "sleep 2000" in pod_processes()
    started = time.monotonic()
    rt.StopContainer(pb.StopContainerRequest(container_id=ids["bg"], timeout=0), timeout=120)
    stop_seconds = time.monotonic() - started
    print(f"\nStopContainer with a child holding stdout took {stop_seconds:.1f}s")
    assert stop_seconds < 10.0, stop_seconds
    stopped = _status(cri, ids["bg"])
    assert (stopped.state, stopped.exit_code) == (pb.CONTAINER_EXITED, 137)
    assert wait_until(lambda: "sleep 1000" not in pod_processes(), 30), pod_processes()


def test_pod_network_through_cni(cri: Cri) -> None:
    """A pod network (CNI bridge in the test's namespace): the pod IP containerd reports is
    on the container's interface in the VM, the pod reaches its gateway, and the node's side
    reaches a server in the pod."""
    pb, rt = cri.pb, cri.runtime
    config = _pod_config(cri, "netpod", network=pb.POD)
    pod_id = rt.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=180
    ).pod_sandbox_id
    try:
        status = rt.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30
        ).status
        pod_ip = status.network.ip
        assert pod_ip.startswith(POD_SUBNET.rsplit(".", 1)[0] + "."), status
        server = (
            "printf '#!/bin/sh\\necho hello-from-$(hostname)\\n' > /tmp/hello; "
            "chmod +x /tmp/hello; exec nc -ll -p 7777 -e /tmp/hello"
        )
        cid = rt.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=pod_id,
                config=_container_config(cri, "web", server, network=pb.POD),
                sandbox_config=config,
            ),
            timeout=120,
        ).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)

        addresses = _exec(cri, cid, "ip", "-4", "-o", "addr", "show")
        assert f" {pod_ip}/" in addresses.stdout.decode(), addresses
        assert _exec(cri, cid, "hostname").stdout == b"netpod\n"
        ping = _exec(cri, cid, "ping", "-c", "1", "-W", "5", GATEWAY)
        assert ping.exit_code == 0, ping

        def connect() -> str:
            done = subprocess.run(
                [
                    "nsenter",
                    f"--net=/run/netns/{cri.netns}",
                    "/bin/busybox",
                    "nc",
                    "-w",
                    "5",
                    pod_ip,
                    "7777",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return done.stdout

        assert wait_until(lambda: connect() == "hello-from-netpod\n", 30, interval=1)
        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1), timeout=60)
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    finally:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
    _assert_pod_gone(cri, pod_id)
    # CNI DEL ran: only loopback and the bridge are left in the node's namespace.
    links = subprocess.run(
        ["ip", "-n", cri.netns, "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    assert names == sorted(["lo", containerd_env.CNI_BRIDGE]), links


@pytest.mark.parametrize(
    ("namespace", "option"),
    [("network", "hostNetwork"), ("ipc", "hostIPC"), ("pid", "hostPID")],
)
def test_host_namespace_pods_are_refused(cri: Cri, namespace: str, option: str) -> None:
    """hostNetwork / hostIPC / hostPID cannot be VM-isolated: RunPodSandbox fails with the
    option's name in the error kubelet shows (the runtime's message, which containerd's shim
    reads from the --log file), before any VM boots, and nothing is left behind."""
    pb, rt = cri.pb, cri.runtime
    config = _pod_config(cri, f"host{namespace}", **{namespace: pb.NODE})
    qemus_before = _qemu_processes(cri.runtime_root)
    with pytest.raises(grpc.RpcError) as refused:
        rt.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=180
        )
    details = refused.value.details()
    assert f"{option} cannot be VM-isolated" in details, details
    assert "OCI runtime create failed" in details and "Traceback" not in details, details
    assert _qemu_processes(cri.runtime_root) == qemus_before
    root = cri.runtime_root
    assert wait_until(lambda: not processes_mentioning(str(root)), 20)
    shims = f"-address {cri.daemon.address}"
    assert wait_until(lambda: not processes_mentioning(shims), 20), processes_mentioning(shims)
    assert list((root / "p").glob("*")) == [] and mounts_below(root) == []


#: A pod that serves three ports: 8080 answers one line read ("got:<line>"), 8081 sends
#: ``seq 1 200000`` (1.3 MB), then both close the connection; 8082 has no listener.
FORWARD_SERVER = (
    "seq 1 200000 > /tmp/big; "
    "printf '#!/bin/sh\\nread line\\necho got:$line\\n' > /tmp/answer; "
    "printf '#!/bin/sh\\ncat /tmp/big\\n' > /tmp/send; chmod +x /tmp/answer /tmp/send; "
    "nc -ll -p 8080 -e /tmp/answer & nc -ll -p 8081 -e /tmp/send & exec sleep 1000"
)
SEQ_OUTPUT = "".join(f"{i}\n" for i in range(1, 200001)).encode()


def _port_forward(
    cri: Cri, pod_id: str, port: int, send: bytes = b""
) -> ws_portforward.PortForward:
    """kubectl's path: CRI PortForward gives a URL on containerd's streaming server (which
    listens in containerd's network namespace, the test's), then a WebSocket to it."""
    from sandbox.pod import network

    url = cri.runtime.PortForward(
        cri.pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[port]), timeout=30
    ).url
    host, _, server_port = url.split("/")[2].rpartition(":")
    nsfd = network.open_netns(Path("/run/netns") / cri.netns)
    try:
        sock = network.in_netns(
            nsfd, lambda: socket.create_connection((host, int(server_port)), timeout=60)
        )
    finally:
        os.close(nsfd)
    forward = ws_portforward.open_port_forward(url, port, sock)
    if send:
        forward.send(send)
    forward.read_all()
    return forward


@pytest.mark.parametrize("handler", [HANDLER, "runc"])
def test_port_forward(cri: Cri, handler: str) -> None:
    """kubectl port-forward to ports a container of a CNI-networked pod listens on: the
    request reaches the server and its answer and close come back, a 1.3 MB answer arrives
    intact, and a port nothing listens on ends in an error, under pysandbox as under runc
    (containerd dials localhost:PORT in the pod's network namespace on the host)."""
    pb, rt = cri.pb, cri.runtime
    config = _pod_config(cri, f"pf{handler}")
    pod_id = rt.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=180
    ).pod_sandbox_id
    try:
        cid = rt.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=pod_id,
                config=_container_config(cri, "web", FORWARD_SERVER),
                sandbox_config=config,
            ),
            timeout=120,
        ).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        listening = "netstat -ltn | grep -c ':808[01] '"
        assert wait_until(lambda: _exec(cri, cid, "sh", "-c", listening).stdout == b"2\n", 30)

        answer = _port_forward(cri, pod_id, 8080, send=b"ping\n")
        assert (bytes(answer.data), bytes(answer.errors)) == (b"got:ping\n", b"")
        started = time.monotonic()
        big = _port_forward(cri, pod_id, 8081)
        seconds = time.monotonic() - started
        assert bytes(big.data) == SEQ_OUTPUT and bytes(big.errors) == b""
        closed = _port_forward(cri, pod_id, 8082)
        assert bytes(closed.data) == b""
        assert b"8082" in bytes(closed.errors), bytes(closed.errors)
        print(f"\n{handler}: {len(SEQ_OUTPUT)} bytes through port-forward in {seconds:.2f}s")
        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1), timeout=60)
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    finally:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
    if handler == HANDLER:
        _assert_pod_gone(cri, pod_id)


@contextlib.contextmanager
def _shared_directory(base: Path) -> Iterator[Path]:
    """A directory that is a shared mount (containerd wants one for Bidirectional, and a
    shared or slave one for HostToContainer); unmounted with all below it after."""
    base.mkdir()
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(base)], check=True)
        yield base
    finally:
        for point in mounts_below(base):  # deepest first
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.mark.parametrize("handler", [HANDLER, "runc"])
def test_privileged_pod_propagation_and_modules(cri: Cri, tmp_path: Path, handler: str) -> None:
    """A privileged container creates a bridge (the guest loads the module on demand, as the
    node's kernel does under runc).

    HostToContainer: a mount made on the host below the volume appears in the container,
    as under runc. Bidirectional: under runc a mount made in the container appears on the
    host; a VM cannot carry it there, so pysandbox keeps it in the pod and logs a warning
    naming the mount (in the --log file containerd's shim reads); the mount still works in
    the container."""
    pb, rt = cri.pb, cri.runtime
    with _shared_directory(tmp_path / "vol") as volume:
        (volume / "h").mkdir()
        (volume / "b").mkdir()
        config = _pod_config(cri, f"prop{handler}")
        config.linux.security_context.privileged = True
        pod_id = rt.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=180
        ).pod_sandbox_id
        try:
            container = _container_config(cri, "prop", "exec sleep 1000")
            container.linux.security_context.privileged = True
            container.mounts.extend(
                [
                    pb.Mount(
                        container_path="/hc",
                        host_path=str(volume / "h"),
                        propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
                    ),
                    pb.Mount(
                        container_path="/bi",
                        host_path=str(volume / "b"),
                        propagation=pb.PROPAGATION_BIDIRECTIONAL,
                    ),
                ]
            )
            cid = rt.CreateContainer(
                pb.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=container, sandbox_config=config
                ),
                timeout=120,
            ).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)

            bridge = _exec(cri, cid, "sh", "-c", "brctl addbr foobar && echo bridge-ok")
            assert (bridge.exit_code, bridge.stdout) == (0, b"bridge-ok\n"), bridge

            (volume / "h" / "sub").mkdir()
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m", "hostside", str(volume / "h" / "sub")],
                check=True,
            )
            (volume / "h" / "sub" / "f").write_text("from-host\n")
            assert wait_until(
                lambda: _exec(cri, cid, "cat", "/hc/sub/f").stdout == b"from-host\n", 30
            ), _exec(cri, cid, "cat", "/hc/sub/f")

            made = _exec(
                cri,
                cid,
                "sh",
                "-c",
                "mkdir /bi/sub && mount -t tmpfs inside /bi/sub && echo made > /bi/sub/g && "
                "cat /bi/sub/g",
            )
            assert (made.exit_code, made.stdout) == (0, b"made\n"), made
            time.sleep(1)
            seen_on_host = (volume / "b" / "sub" / "g").exists()
            log = (
                cri.daemon.base
                / "state/io.containerd.runtime.v2.task"
                / CRI_NAMESPACE
                / cid
                / "log.json"
            )
            if handler == "runc":
                assert seen_on_host
            else:
                assert not seen_on_host
                assert not os.path.ismount(volume / "b" / "sub")
                warnings = [
                    entry
                    for entry in map(json.loads, log.read_text().splitlines())
                    if entry["level"] == "warning"
                ]
                assert len(warnings) == 1, warnings
                assert warnings[0]["msg"].startswith("mount /bi: rshared propagation"), warnings
            rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1), timeout=60)
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
        finally:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
    if handler == HANDLER:
        _assert_pod_gone(cri, pod_id)


def _assert_pod_gone(cri: Cri, pod_id: str) -> None:
    root = cri.runtime_root
    assert wait_until(lambda: not processes_mentioning(str(root)), 20), processes_mentioning(
        str(root)
    )
    shim = f"-id {pod_id} -address {cri.daemon.address}"
    assert wait_until(lambda: not processes_mentioning(shim), 20), processes_mentioning(shim)
    assert list((root / "p").glob("*")) == []
    assert mounts_below(root) == []
    assert mounts_below(cri.daemon.base / "state") == []
    listed = subprocess.run(
        [containerd_env.RUNTIME, "--root", str(root), "list", "-q"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.stdout.split() == []
