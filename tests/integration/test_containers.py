"""Containers in a real pod VM: each OCI spec field checked from inside the container."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc
from sandbox.errors import AgentError, CommandError, FailureReason
from sandbox.pod.lifecycle import Pod
from sandbox.run.default_spec import DEFAULT_CAPABILITIES
from tests.integration.helpers import busybox_spec, live_container, run_container
from tests.processes import wait_until

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


def test_oom_of_an_exec_is_reported_for_that_exec(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "echo ready; exec sleep 1000")
    spec["linux"]["resources"]["memory"] = {"limit": 16 * 2**20, "swap": 16 * 2**20}
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        fits = box.exec("fits", "true")
        assert (fits.status, fits.signal, fits.oom) == (0, 0, False)
        hog = box.exec("hog", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
        assert (hog.status, hog.signal, hog.oom) == (137, 9, True)
        assert box.client.stats_container(box.cid)["oom_kills"] == 1
        after = box.exec("after", "true")
        assert (after.status, after.oom) == (0, False)
        assert box.client.container_status(box.cid)[0] == "running"


def test_pids_limit(shared_pod: Pod) -> None:
    script = "for i in 1 2 3 4 5 6 7 8; do sleep 3 & done 2>&1; wait"
    spec = busybox_spec("sh", "-c", script)
    spec["linux"]["resources"]["pids"] = {"limit": 4}
    result = run_container(shared_pod, spec)
    out = result.out + result.stderr.decode()
    assert "can't fork" in out or "Resource temporarily unavailable" in out
    assert not result.oom


def test_stdin_is_relayed_and_eof_delivered(shared_pod: Pod) -> None:
    result = run_container(
        shared_pod, busybox_spec("sh", "-c", "cat; echo end"), stdin=b"line one\nline two\n"
    )
    assert result.stdout == b"line one\nline two\nend\n"


def test_large_output_without_loss(shared_pod: Pod, tmp_path: Path) -> None:
    # 100 MiB+ of random blocks whose size divides no chunk size: any lost, repeated or
    # reordered chunk changes the bytes received. (cat is cheap under TCG; seq or md5sum are
    # not: they cost more guest CPU than the transport.)
    block = os.urandom(1_000_003)
    (tmp_path / "block").write_bytes(block)
    copies = 110
    spec = busybox_spec("cat", *["/data/block"] * copies)
    spec["mounts"].append(
        {
            "destination": "/data",
            "type": "bind",
            "source": str(tmp_path),
            "options": ["rbind", "ro"],
        }
    )
    started = time.monotonic()
    result = run_container(shared_pod, spec, timeout=300)
    elapsed = time.monotonic() - started
    print(f"\n{len(block) * copies / 2**20:.0f} MiB through stdout in {elapsed:.1f}s")
    assert (result.status, result.stderr) == (0, b"")
    assert len(result.stdout) == len(block) * copies > 100 * 2**20
    assert result.stdout == block * copies


def test_stdin_stdout_and_stderr_at_once_without_deadlock(shared_pod: Pod) -> None:
    # The host writes stdin while the process echoes it to both outputs: every pipe fills up
    # at some point, and each side must keep draining the others.
    data = os.urandom(8 * 2**20)
    with live_container(shared_pod, busybox_spec("tee", "/dev/stderr"), stdin=True) as box:
        for offset in range(0, len(data), 2**20):
            box.client.write_stdin(box.cid, "", data[offset : offset + 2**20])
        box.client.close_stdin(box.cid)
        assert box.client.wait_process(box.cid, "", 120)[:2] == (0, 0)
        assert box.stdout.wait_closed() == data
        assert box.stderr.wait_closed() == data


def test_missing_executable_error_and_pod_still_usable(shared_pod: Pod) -> None:
    with pytest.raises(CommandError, match=r'exec: "no-such-cmd": executable file not found') as e:
        run_container(shared_pod, busybox_spec("no-such-cmd"))
    assert (e.value.reason, e.value.exit_code) == (FailureReason.EXECUTABLE_NOT_FOUND, 127)
    with pytest.raises(CommandError, match=r'exec: "/etc/passwd": permission denied') as e:
        run_container(shared_pod, busybox_spec("/etc/passwd"))
    assert (e.value.reason, e.value.exit_code) == (FailureReason.NOT_EXECUTABLE, 126)
    spec = busybox_spec("true")
    spec["linux"]["namespaces"].append({"type": "bogus"})
    with pytest.raises(AgentError, match="bogus") as invalid:
        run_container(shared_pod, spec)
    assert (invalid.value.reason, invalid.value.code) == (
        FailureReason.INVALID_SPEC,
        "INVALID_ARGUMENT",
    )
    assert run_container(shared_pod, busybox_spec("echo", "still fine")).out == "still fine\n"


def test_cgroup_limits_written(shared_pod: Pod) -> None:
    spec = busybox_spec(
        "sh", "-c", "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max"
    )
    spec["linux"]["resources"]["memory"] = {"limit": 64 << 20}
    spec["linux"]["resources"]["pids"] = {"limit": 32}
    spec["linux"]["resources"]["cpu"] = {"quota": 50000, "period": 100000}
    assert run_container(shared_pod, spec).out.split() == [str(64 << 20), "32", "50000", "100000"]


def _cgroup_path(cid: str) -> str:
    return f"/sys/fs/cgroup/pysandbox/{cid}"


def test_exec_runs_in_the_container_with_its_own_exit_code(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "echo shared > /tmp/from-init; echo ready; exec sleep 1000")
    spec["root"]["readonly"] = False
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        script = "cat /tmp/from-init /proc/1/comm; hostname; echo oops >&2; exit 5"
        result = box.exec("e1", "sh", "-c", script)
        assert (result.status, result.signal) == (5, 0)
        assert (result.stdout, result.stderr) == (b"shared\nsleep\npysandbox\n", b"oops\n")
        # exec's process fields: user, umask, oom_score_adj, cwd, env.
        result = box.exec(
            "e2",
            "sh",
            "-c",
            "id -u; umask; cat /proc/self/oom_score_adj; pwd; echo $WHO",
            user={"uid": 1234, "gid": 1234, "umask": 0o077},
            oomScoreAdj=700,
            cwd="/tmp",
            env=["PATH=/bin", "WHO=exec"],
        )
        assert result.out.split() == ["1234", "0077", "700", "/tmp", "exec"]
        with pytest.raises(AgentError, match="in use"):
            box.start_exec("e1", "true")
        with pytest.raises(CommandError, match=r'exec: "nope": executable file not found') as e:
            box.start_exec("e3", "nope")
        assert (e.value.rpc, e.value.exec_id, e.value.exit_code) == ("ExecProcess", "e3", 127)
        assert box.client.container_status(box.cid)[0] == "running"
        assert box.exec("e3", "true").status == 0


def test_concurrent_execs_with_one_id_run_once(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "echo ready; exec sleep 1000")
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        process = json.dumps({**box.spec["process"], "args": ["sleep", "1000"]}).encode()
        outcomes: list[str] = []

        def attempt() -> None:
            try:
                box.client.exec_process(box.cid, "twin", process)
                outcomes.append("started")
            except AgentError as exc:
                outcomes.append("in use" if "in use" in str(exc) else str(exc))

        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(outcomes) == ["in use", "started"]
        # sleep (init) and one twin (the exec runtimes themselves exit after "ready").
        assert wait_until(lambda: len(box.client.list_processes(box.cid)) == 2, 10), (
            box.client.list_processes(box.cid)
        )


def test_exec_gets_the_containers_seccomp_profile(shared_pod: Pod) -> None:
    # A seccomp filter is per process: it does not come with setns. As runc does, every exec
    # gets the container's profile, or an exec'd process would escape it.
    spec = busybox_spec("sh", "-c", "echo ready; sleep 1000")
    spec["root"]["readonly"] = False
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
    }
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        # The second exec reads the program the first compiled (agent.oci.seccomp_cache).
        for exec_id in ("e1", "e2"):
            result = box.exec(
                exec_id, "sh", "-c", "grep Seccomp: /proc/self/status; mkdir /tmp/d 2>&1"
            )
            assert "Seccomp:\t2" in result.out and "Permission denied" in result.out
            assert result.status == 1
    # Another profile in the same guest is its own program, not the one kept above.
    spec["linux"]["seccomp"]["syscalls"][0]["names"] = ["chmod", "fchmodat", "fchmodat2"]
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        script = "mkdir /tmp/d && echo made; chmod 700 /tmp/d 2>&1"
        for exec_id in ("e1", "e2"):
            result = box.exec(exec_id, "sh", "-c", script)
            assert "made" in result.out and "Permission denied" in result.out
            assert result.status == 1
            box.exec(f"{exec_id}-rm", "rmdir", "/tmp/d")


def test_signal_one_exec_then_kill_all_ends_the_container(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "sleep 1000 & sleep 1000 & echo ready; wait")
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        victim, _, _ = box.start_exec("victim", "sleep", "1000")
        bystander, _, _ = box.start_exec("bystander", "sleep", "1000")
        box.client.signal(box.cid, "victim", signal.SIGTERM)
        assert box.client.wait_process(box.cid, "victim", 30) == (128 + 15, 15, False)
        pids = set(box.client.list_processes(box.cid))
        assert victim not in pids and {box.pid, bystander} <= pids and len(pids) >= 4
        assert box.client.container_status(box.cid)[0] == "running"
        box.client.signal(box.cid, "victim", signal.SIGTERM)  # already exited: a no-op
        box.client.signal(box.cid, "", signal.SIGKILL, all=True)
        assert box.client.wait_process(box.cid, "", 30)[:2] == (137, 9)
        assert box.client.wait_process(box.cid, "bystander", 30)[:2] == (137, 9)
        assert box.client.container_status(box.cid)[0] == "stopped"
        wait_until(lambda: box.client.list_processes(box.cid) == [], 10)
        assert box.client.list_processes(box.cid) == []


def test_kill_all_catches_processes_forked_meanwhile(shared_pod: Pod) -> None:
    # Without a pid namespace killing the init kills nothing else: a kill of "all" processes
    # must reach every one, including those a fork loop creates while it is delivered.
    script = "sh -c 'while :; do sleep 100 & done' 2>/dev/null & echo ready; wait"
    spec = busybox_spec("sh", "-c", script)
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    spec["linux"]["resources"]["pids"] = {"limit": 40}
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        # The fork loop runs on while the kill is delivered (up to the pids limit).
        assert wait_until(lambda: len(box.client.list_processes(box.cid)) > 10, 30), (
            box.client.list_processes(box.cid)
        )
        box.client.signal(box.cid, "", signal.SIGKILL, all=True)
        assert box.client.wait_process(box.cid, "", 30)[:2] == (137, 9)
        # The killed die at once; survivors, if any, would stay (sleep 100, the fork loop).
        wait_until(lambda: box.client.list_processes(box.cid) == [], 10)
        assert box.client.list_processes(box.cid) == []


def test_sysctls_are_set_in_the_containers_namespaces_only(shared_pod: Pod) -> None:
    keys = {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.ping_group_range": "0\t2147483647",
        "kernel.shm_rmid_forced": "1",
    }
    paths = ["/proc/sys/" + key.replace(".", "/") for key in keys]
    spec = busybox_spec("cat", *paths)
    spec["linux"]["sysctl"] = keys
    with shared_pod.client() as agent:
        guest_before = [agent.read_file(path) for path in paths]
        assert run_container(shared_pod, spec).out.splitlines() == list(keys.values())
        assert [agent.read_file(path) for path in paths] == guest_before
    assert guest_before != [f"{value}\n".encode() for value in keys.values()]
    spec["linux"]["sysctl"] = {"vm.swappiness": "10"}
    with pytest.raises(AgentError, match=r"sysctl \"vm\.swappiness\" is not in a separate kernel"):
        run_container(shared_pod, spec)
    spec["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    with pytest.raises(AgentError, match=r"net\.ipv4\.ip_forward"):
        run_container(shared_pod, spec)


def test_oom_score_adj_and_umask(shared_pod: Pod) -> None:
    script = (
        "cat /proc/self/oom_score_adj; umask; touch /tmp/f; mkdir /tmp/d; stat -c %a /tmp/f /tmp/d"
    )
    spec = busybox_spec("sh", "-c", script, user={"uid": 0, "gid": 0, "umask": 0o027})
    spec["process"]["oomScoreAdj"] = 500
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    assert run_container(shared_pod, spec).out.split() == ["500", "0027", "640", "750"]
    spec["process"]["user"] = {"uid": 0, "gid": 0}
    del spec["process"]["oomScoreAdj"]
    assert run_container(shared_pod, spec).out.split() == ["0", "0022", "644", "755"]


def test_terminal_resize_reaches_the_program(shared_pod: Pod) -> None:
    script = (
        "trap 'stty size; exit 0' WINCH; stty size; echo ready; "
        "i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; exit 3"
    )
    spec = busybox_spec("sh", "-c", script)
    spec["process"]["terminal"] = True
    with live_container(shared_pod, spec) as box:
        assert b"40 100" not in box.stdout.wait_for(b"ready")
        box.client.resize(box.cid, "", 40, 100)
        assert box.client.wait_process(box.cid, "", 60)[:2] == (0, 0)
        assert b"ready\r\n40 100\r\n" in box.stdout.wait_closed()
        assert box.stderr.wait_closed() == b""


def test_exec_with_terminal_resize_and_stdin(shared_pod: Pod) -> None:
    with live_container(shared_pod, busybox_spec("sh", "-c", "echo ready; sleep 1000")) as box:
        box.stdout.wait_for(b"ready\n")
        with pytest.raises(AgentError, match="no terminal"):
            box.client.resize(box.cid, "", 10, 10)
        script = "stty size; echo ready; read line; echo got $line; stty size; exit 4"
        _, out, _ = box.start_exec("tty", "sh", "-c", script, terminal=True, stdin=True)
        # The whole line: n_tty writes "ready" and its "\r\n" (ONLCR) in two steps, and the
        # echo of input sent in between would land between them.
        assert b"30 90" not in out.wait_for(b"ready\r\n")
        box.client.resize(box.cid, "tty", 30, 90)
        box.client.write_stdin(box.cid, "tty", b"hello\n")
        assert box.client.wait_process(box.cid, "tty", 60)[:2] == (4, 0)
        assert out.wait_closed().endswith(b"hello\r\ngot hello\r\n30 90\r\n")  # echo, then us
        with pytest.raises(AgentError, match="terminal is closed"):
            box.client.resize(box.cid, "tty", 10, 10)  # it exited
        with pytest.raises(AgentError, match="stdin is closed"):
            box.client.write_stdin(box.cid, "tty", b"late\n")


def test_stats_and_update_resources(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "sleep 1000 & sleep 1000 & echo ready; wait")
    spec["linux"]["resources"]["memory"] = {"limit": 64 << 20}
    spec["linux"]["resources"]["pids"] = {"limit": 32}
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        seen = [box.client.stats_container(box.cid)]

        def three_processes() -> bool:  # sh and its two sleeps
            seen.append(box.client.stats_container(box.cid))
            return bool(seen[-1]["pids_current"] == 3)

        assert wait_until(three_processes, 10), seen[-1]
        stats = seen[-1]
        assert stats["memory_limit_bytes"] == 64 << 20
        assert 0 < stats["memory_usage_bytes"] < 64 << 20
        assert stats["cpu_usage_usec"] > 0 and stats["oom_kills"] == 0
        resources = {
            "memory": {"limit": 96 << 20},
            "pids": {"limit": 50},
            "cpu": {"quota": 20000, "period": 100000},
        }
        box.client.update_container(box.cid, json.dumps(resources).encode())
        limits = "/sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max"
        expected = [str(96 << 20), "50", "20000", "100000"]
        assert box.exec("read1", "sh", "-c", f"cat {limits}").out.split() == expected
        assert box.client.stats_container(box.cid)["memory_limit_bytes"] == 96 << 20
        with pytest.raises(AgentError, match="malformed resources"):
            box.client.update_container(box.cid, b"{not json")
        bad_swap = {"memory": {"limit": 128 << 20, "swap": 32 << 20}}
        with pytest.raises(AgentError, match="less than the memory limit"):
            box.client.update_container(box.cid, json.dumps(bad_swap).encode())
        assert box.exec("read2", "sh", "-c", f"cat {limits}").out.split() == expected


def test_pause_and_resume(shared_pod: Pod) -> None:
    spec = busybox_spec("sh", "-c", "while :; do echo tick; sleep 0.1; done")
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"tick\n")
        box.client.pause_container(box.cid)
        assert b"frozen 1" in box.client.read_file(f"{_cgroup_path(box.cid)}/cgroup.events")
        time.sleep(0.5)  # output already in flight reaches us
        output, cpu = box.stdout.data, box.client.stats_container(box.cid)["cpu_usage_usec"]
        time.sleep(2)
        assert box.stdout.data == output
        assert box.client.stats_container(box.cid)["cpu_usage_usec"] == cpu
        assert box.client.container_status(box.cid)[0] == "paused"
        with pytest.raises(AgentError, match="is paused, not running"):
            box.exec("while-paused", "true")  # runc refuses too; it would hang in the freezer
        box.client.resume_container(box.cid)
        assert box.client.container_status(box.cid)[0] == "running"
        assert b"frozen 0" in box.client.read_file(f"{_cgroup_path(box.cid)}/cgroup.events")
        box.stdout.wait_for(output + b"tick\ntick\n", timeout=30)
        # A paused container can be removed (crictl rm -f): everything is killed.
        box.client.pause_container(box.cid)
        box.client.remove_container(box.cid)
        with pytest.raises(AgentError, match="does not exist"):
            box.client.container_status(box.cid)
        assert box.stdout.wait_closed(timeout=30).startswith(output)


def test_pause_of_a_stopped_container_is_refused(shared_pod: Pod) -> None:
    with live_container(shared_pod, busybox_spec("true")) as box:
        assert box.client.wait_process(box.cid, "", 30)[:2] == (0, 0)
        with pytest.raises(AgentError, match="stopped, not running"):
            box.client.pause_container(box.cid)
        with pytest.raises(AgentError, match="stopped, not running"):
            box.exec("late", "true")


def test_malformed_container_requests_get_errors_and_agent_survives(shared_pod: Pod) -> None:
    rootfs = "/run/pysandbox/none"
    with shared_pod.client() as client:
        with pytest.raises(AgentError, match="malformed oci spec"):
            client.create_container("bad1", b"{not json", rootfs)
        with pytest.raises(AgentError, match="malformed oci spec: not an object"):
            client.create_container("bad2", b"[1, 2]", rootfs)
        with pytest.raises(AgentError, match="larger than 1 MiB"):
            client.create_container("bad3", b" " * (3 << 19), rootfs)
        with pytest.raises(AgentError, match="invalid id"):
            client.create_container("../escape", b"{}", rootfs)
        with pytest.raises(AgentError, match="is not a directory under"):
            client.create_container("bad4", b"{}", "/etc")
        with pytest.raises(AgentError, match="does not exist"):
            client.start_container("never-created")
        with pytest.raises(AgentError, match="does not exist"):
            client.signal("never-created", "", signal.SIGKILL)
    spec = busybox_spec("true")
    spec["process"]["args"] = "true"
    with pytest.raises(AgentError, match=r"process\.args"):
        run_container(shared_pod, spec)
    with live_container(shared_pod, busybox_spec("sh", "-c", "echo ready; sleep 1000")) as box:
        box.stdout.wait_for(b"ready\n")
        with pytest.raises(AgentError, match="malformed process json"):
            box.client.exec_process(box.cid, "e1", b"{oops")
        with pytest.raises(AgentError, match="invalid signal"):
            box.client.signal(box.cid, "", 99)
        assert box.exec("e1", "echo", "fine").out == "fine\n"
    # A message over the 4 MiB limit is refused at the pod's socket; the agent carries on.
    options = [("grpc.max_send_message_length", 16 << 20)]
    with grpc.insecure_channel(shared_pod.agent_address, options=options) as channel:
        stub = pb_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        request = pb.WriteFileRequest(path="/tmp/huge", data=b"x" * (5 << 20))
        with pytest.raises(grpc.RpcError) as caught:
            stub.WriteFile(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert run_container(shared_pod, busybox_spec("echo", "still fine")).out == "still fine\n"


def test_finished_execs_release_the_agents_file_descriptors(shared_pod: Pod) -> None:
    # Health probes exec into long-running containers every few seconds: what an exec holds in
    # the agent (pipes, pty) must be released once it exited and its output was read, or the
    # agent runs out of file descriptors. This container sees the guest's /proc (no pid
    # namespace) and may inspect the agent (PID 1).
    spec = busybox_spec("sh", "-c", "echo ready; exec sleep 1000")
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    caps = [*DEFAULT_CAPABILITIES, "CAP_SYS_PTRACE"]
    spec["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
    agent_fds = "ls /proc/1/fd | wc -l"
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")
        before = int(box.exec("count0", "sh", "-c", agent_fds).out)
        for n in range(12):
            box.exec(f"probe{n}", "true")  # stdin closed by the host
            box.exec(f"quiet{n}", "true", stdin=True)
            _, out, _ = box.start_exec(f"tty{n}", "true", terminal=True, stdin=True)
            assert box.client.wait_process(box.cid, f"tty{n}", 60)[:2] == (0, 0)
            out.wait_closed()
        after = int(box.exec("count1", "sh", "-c", agent_fds).out)
        assert after - before < 4, (before, after)


def test_removed_and_failed_containers_leave_no_cgroup(shared_pod: Pod) -> None:
    with pytest.raises(AgentError, match="executable file not found"):
        run_container(shared_pod, busybox_spec("no-such-cmd"))  # fails after joining its cgroup
    spec = busybox_spec("sh", "-c", "sleep 1000 & sleep 1000 & echo ready; wait")
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    with live_container(shared_pod, spec) as box:
        box.stdout.wait_for(b"ready\n")  # removed with processes that do not die with the init
    # A cgroup mount shows a container only its own cgroup: the lister looks at the guest's
    # whole hierarchy through the agent's root (no pid namespace, CAP_SYS_PTRACE). Only its
    # own cgroup is left below the agent's.
    where = "/proc/1/root/sys/fs/cgroup/pysandbox"
    lister = busybox_spec("find", where, "-mindepth", "1", "-type", "d")
    lister["linux"]["namespaces"] = [n for n in lister["linux"]["namespaces"] if n["type"] != "pid"]
    for caps in lister["process"]["capabilities"].values():
        caps.append("CAP_SYS_PTRACE")
    assert len(run_container(shared_pod, lister).out.split()) == 1
