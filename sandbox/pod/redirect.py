"""The port-forward rule in a pod's network namespace (sandbox/pod/portforward.py).

``iptables -t nat -A OUTPUT -o lo -p tcp -d 127.0.0.1/32 -j REDIRECT --to-ports 65535``: every
TCP connection made to 127.0.0.1 in the namespace goes to the agent proxy's listener on
:data:`LISTEN_PORT`, which relays it into the VM. The functions act on the network namespace
of the calling thread (run them through :func:`sandbox.pod.network.in_netns`). They need the
``iptables`` command (either backend); NetworkError says so when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess

from sandbox.errors import NetworkError

#: The forwarder's port on the pod namespace's loopback. A client that asks for this very port
#: reaches the listener without the rule; SO_ORIGINAL_DST then names the same port, so it is
#: forwarded like any other.
LISTEN_PORT = 65535
#: iptables' arguments (after the table and the command) of the rule.
RULE = ("OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1/32", "-j", "REDIRECT")
RULE_TO = ("--to-ports", str(LISTEN_PORT))


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("iptables") or "/usr/sbin/iptables"
    try:
        return subprocess.run(
            [binary, "-w", "5", "-t", "nat", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        raise NetworkError(
            "iptables is missing (apt package iptables): kubectl port-forward needs it"
        ) from None
    except subprocess.TimeoutExpired:
        raise NetworkError("iptables did not finish within 30 s") from None


def redirect_present() -> bool:
    """Whether the rule is in the current thread's network namespace."""
    return _iptables("-C", *RULE, *RULE_TO).returncode == 0


def add_redirect() -> None:
    """Install the rule in the current thread's network namespace (once); NetworkError with
    iptables' message when it cannot."""
    if redirect_present():
        return
    done = _iptables("-A", *RULE, *RULE_TO)
    if done.returncode != 0:
        raise NetworkError(f"port-forward rule: iptables: {done.stderr.strip()[:300]}")


def remove_redirect() -> list[str]:
    """Remove the rule from the current thread's network namespace; the problems, if any
    (none without iptables: then the rule cannot have been added)."""
    for _ in range(8):  # one per add_redirect that raced another; normally one
        try:
            if not redirect_present():
                return []
        except NetworkError:
            return []
        done = _iptables("-D", *RULE, *RULE_TO)
        if done.returncode != 0:
            return [f"port-forward rule: iptables: {done.stderr.strip()[:300]}"]
    return ["port-forward rule: still present after 8 deletions"]
