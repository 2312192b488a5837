"""Agent and protocol versions, part of the agent's published surface.

The host refuses an agent whose protocol MAJOR differs from :data:`PROTOCOL_VERSION`'s.
"""

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = "1.15"  # 1.1: ConfigureNetwork; 1.2: Failure reasons in trailing metadata;
# 1.3: ListProcesses carries the process table; output streams end once the process exited;
# 1.4: StartContainer runs startContainer hooks (Failure reason HOOK_FAILED)
# 1.5: PortForward
# 1.6: ConfigureNetwork.container_id (the pod network in a container's network namespace)
# 1.7: PrepareTemplate
# 1.8: CreateContainer.start / close_stdin (create, start and EOF in one call);
#      Restored.share (the pod share mounted in the same call)
# 1.9: ReadStdout/ReadStderr to an output port (ProcessRef.stream_port, Chunk.on_port)
# 1.10: CloseOutput (the host's reader of a process's output is gone)
# 1.11: Restored.hostname (the guest's own, as the host's is for runc's containers)
# 1.12: CreateContainer.stdin_null (the init's stdin is /dev/null, as runc gives it)
# 1.13: ExecProcess.close_stdin (EOF on the exec's stdin pipe in the same call),
#       ProcessResponse.stdin_closed
# 1.14: Restored.cgroup_layout (the containers' cgroup layout set up ahead),
#       RestoredResponse.protocol_version, CreateContainer.files (written first)
# 1.15: CreateContainer.stderr_to_stdout (one pipe for both, as runc under `2>&1`)


def protocol_major(version: str) -> int:
    """Return the MAJOR of a "MAJOR.MINOR" protocol string; ValueError when malformed."""
    major, _, minor = version.partition(".")
    if not major.isdigit() or not minor.isdigit() or len(version) > 16:
        raise ValueError(f"malformed protocol version {version[:32]!r}")
    return int(major)
