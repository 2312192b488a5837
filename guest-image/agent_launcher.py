"""Starts the guest agent as PID 1 with fewer imports on the boot path.

Installed as ``/usr/lib/pysandbox/agent_launcher.py``; ``/init`` runs::

    python3.11 -u -S -c "import agent_launcher; agent_launcher.main()"

which behaves as ``python3.11 -u -m agent`` (same ``agent.__main__.main``) except that

* ``-S`` skips ``site`` (the image has no site-packages, ``.pth`` files or sitecustomize;
  ``PYTHONPATH`` still applies) and ``-c`` skips ``runpy``;
* the modules in ``agentapi.lazy_import.PROXY_LAZY_MODULES`` (those of a process serving
  gRPC with h2, as the host's per-pod proxy does) are imported lazily: the import
  statement binds a module object at once, the module's code runs on the first attribute
  access. Whoever uses such a module gets it fully loaded; only nobody pays for it at boot
  when nobody uses it.

Why these modules (measured under TCG, see docs/performance.md): ``protobuf``'s
``descriptor_pool`` imports the pure-Python message implementation (and through it
``text_format``) even when the ``upb`` C implementation is in use; ``dataclasses`` imports
``inspect`` (for h2's event classes) but uses it only for a class without a docstring.

The lazy loader is in ``agentapi/lazy_import.py`` (shared with the host's command line);
children the agent spawns are unaffected.
"""

from __future__ import annotations

from agentapi import lazy_import


def main() -> None:
    lazy_import.install(lazy_import.PROXY_LAZY_MODULES)
    from agent.__main__ import main as agent_main

    agent_main([])


if __name__ == "__main__":
    main()
