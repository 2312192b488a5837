"""Containers in a real pod VM: each OCI spec field checked from inside the container."""

from __future__ import annotations

import pytest

from sandbox.errors import AgentError
from sandbox.pod import Pod
from sandbox.spec import DEFAULT_CAPABILITIES
from tests.integration.helpers import busybox_spec, run_container

CAP_NUMBERS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}


def test_echo_and_exit_codes(shared_pod: Pod) -> None:
    result = run_container(shared_pod, busybox_spec("sh", "-c", "echo out; echo err >&2; exit 7"))
    assert (result.status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


def test_killed_by_signal_reports_128_plus_n(shared_pod: Pod) -> None:
    # Without a pid namespace the shell is not an init process, so SIGKILL reaches it.
    spec = busybox_spec("sh", "-c", "kill -9 $$")
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    result = run_container(shared_pod, spec)
    assert (result.status, result.signal) == (137, 9)


def test_user_groups_env_cwd_hostname(shared_pod: Pod) -> None:
    spec = busybox_spec(
        "sh",
        "-c",
        "id; pwd; echo $GREETING; hostname",
        user={"uid": 1000, "gid": 1001, "additionalGids": [2000]},
        env=["PATH=/bin:/usr/bin", "GREETING=hello there"],
        cwd="/tmp",
    )
    spec["hostname"] = "box-7"
    lines = run_container(shared_pod, spec).out.splitlines()
    assert lines[0].startswith("uid=1000 gid=1001") and "2000" in lines[0]
    assert lines[1:] == ["/tmp", "hello there", "box-7"]


def test_capabilities_match_the_spec(shared_pod: Pod) -> None:
    result = run_container(shared_pod, busybox_spec("grep", "^Cap", "/proc/self/status"))
    caps = dict(line.split(":\t") for line in result.out.splitlines())
    expected = sum(1 << CAP_NUMBERS[name] for name in DEFAULT_CAPABILITIES)
    assert int(caps["CapEff"], 16) == expected
    assert int(caps["CapBnd"], 16) == expected
    assert int(caps["CapInh"], 16) == 0


def test_no_new_privs_and_seccomp_default_profile(shared_pod: Pod) -> None:
    script = (
        "grep NoNewPrivs /proc/self/status; grep Seccomp: /proc/self/status; "
        "mount -t tmpfs none /mnt 2>&1; echo rc=$?"
    )
    out = run_container(shared_pod, busybox_spec("sh", "-c", script)).out
    assert "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out
    assert "permission denied" in out.lower() and "rc=1" in out


def test_seccomp_profile_errno_for_one_syscall(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "mkdir /tmp/d 2>&1; echo rc=$?")
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
    }
    out = run_container(shared_pod, spec).out
    assert "Permission denied" in out and "rc=1" in out


def test_rlimits(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "ulimit -n; ulimit -Hn")
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]
    assert run_container(shared_pod, spec).out.split() == ["321", "654"]


def test_masked_and_readonly_paths(shared_pod: Pod) -> None:
    script = (
        "wc -c < /proc/timer_list; ls /proc/acpi | wc -l; "
        "echo 1 > /proc/sys/kernel/domainname 2>&1 && echo wrote || echo refused"
    )
    out = run_container(shared_pod, busybox_spec("sh", "-c", script)).out.split()
    assert out == ["0", "0", "refused"]


def test_readonly_root(shared_pod: Pod) -> None:
    spec = busybox_spec(
        "sh",
        "-c",
        "touch /x 2>/dev/null && echo writable || echo readonly; "
        "touch /tmp/x 2>/dev/null && echo tmp-writable || echo tmp-ro",
    )
    spec["root"]["readonly"] = True
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    assert run_container(shared_pod, spec, overlay=False).out.split() == [
        "readonly",
        "tmp-writable",
    ]


def test_overlay_root_is_writable_and_thrown_away(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "test -e /marker && echo seen; touch /marker && echo ok")
    spec["root"]["readonly"] = False
    assert run_container(shared_pod, spec).out.split() == ["ok"]
    assert run_container(shared_pod, spec).out.split() == ["ok"]  # nothing persisted


def test_memory_limit_oom_is_reported(shared_pod: Pod) -> None:
    spec = busybox_spec("dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
    spec["linux"]["resources"]["memory"] = {"limit": 16 * 2**20, "swap": 16 * 2**20}
    result = run_container(shared_pod, spec)
    assert result.signal == 9 and result.oom


def test_pids_limit(shared_pod: Pod) -> None:
    script = "for i in 1 2 3 4 5 6 7 8; do sleep 3 & done 2>&1; wait"
    spec = busybox_spec("sh", "-c", script)
    spec["linux"]["resources"]["pids"] = {"limit": 4}
    out = run_container(shared_pod, spec).out + run_container(shared_pod, spec).stderr.decode()
    assert "can't fork" in out or "Resource temporarily unavailable" in out


def test_stdin_is_relayed_and_eof_delivered(shared_pod: Pod) -> None:
    result = run_container(
        shared_pod, busybox_spec("sh", "-c", "cat; echo end"), stdin=b"line one\nline two\n"
    )
    assert result.stdout == b"line one\nline two\nend\n"


def test_large_output_without_loss(shared_pod: Pod) -> None:
    size = 32 * 2**20
    result = run_container(shared_pod, busybox_spec("head", "-c", str(size), "/dev/urandom"))
    assert result.status == 0 and len(result.stdout) == size


def test_missing_executable_error_and_pod_still_usable(shared_pod: Pod) -> None:
    with pytest.raises(AgentError, match=r'exec: "no-such-cmd": executable file not found'):
        run_container(shared_pod, busybox_spec("no-such-cmd"))
    spec = busybox_spec("true")
    spec["linux"]["namespaces"].append({"type": "bogus"})
    with pytest.raises(AgentError, match="bogus"):
        run_container(shared_pod, spec)
    assert run_container(shared_pod, busybox_spec("echo", "still fine")).out == "still fine\n"


def test_cgroup_limits_written(shared_pod: Pod) -> None:
    spec = busybox_spec(
        "sh", "-c", "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max"
    )
    spec["linux"]["resources"]["memory"] = {"limit": 64 << 20}
    spec["linux"]["resources"]["pids"] = {"limit": 32}
    spec["linux"]["resources"]["cpu"] = {"quota": 50000, "period": 100000}
    assert run_container(shared_pod, spec).out.split() == [str(64 << 20), "32", "50000", "100000"]
