"""The in-guest mini-runc: applies an OCI runtime spec and execs the container's process.

``python3 -m agent.oci.init`` creates a container, ``python3 -m agent.oci.exec`` runs one more
process in it; docs/oci-in-guest.md states the contract with the agent. Modules:

- :mod:`ocispec.spec` (a package of its own, shared with the host, which validates the spec
  before a VM boots) parses and validates the OCI config subset into plain typed records;
  the runtime parses what it receives again before it changes anything;
- :mod:`agent.oci.syscalls` is the seam every side effect goes through (real and recording);
- :mod:`agent.oci.rootfs`, :mod:`~agent.oci.cgroups`, :mod:`~agent.oci.capabilities`
  implement the steps (seccomp programs come compiled from :mod:`ocispec.seccomp`);
  :mod:`agent.oci.process` the per-process part shared by init and exec;
  :mod:`agent.oci.hooks` the startContainer hooks;
  :mod:`agent.oci.init` and :mod:`agent.oci.exec` order them.

Exceptions (in :mod:`agent.oci.errors`; ``.message`` and ``.exit_code`` on all; the reason
the agent is told is ``.reason``, INVALID_SPEC for a SpecError)::

    ocispec.errors.SpecError   the spec is invalid; raised before any side effect (exit 1)
    OciError                   base of the failures below; .exit_code is the runtime's (1)
     ├── SetupError            a setup step failed; the message names the step and the errno text
     ├── HookError             a startContainer hook failed (after start; the process exits 1)
     └── ExecError             the program cannot be run; exit_code 127 (not found) or 126

The package imports only the stdlib modules it needs (no dataclasses/typing/argparse at run
time): it starts under TCG emulation, where every import costs tens of milliseconds.
"""
