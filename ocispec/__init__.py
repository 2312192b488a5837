"""The OCI runtime spec as typed values: parse and validate config.json; shared by host and guest.

The host (``sandbox``) parses a bundle's config.json with :func:`ocispec.spec.parse_spec`
before any VM starts and refuses an invalid one with a message that names the field; the
guest's runtime (``agent.oci``) parses what it receives again before it changes anything
(defence in depth) and applies the typed result. Nothing here touches the system: no
syscalls, no files, no environment.

Modules:

- :mod:`ocispec.spec` -- the records (:class:`~ocispec.spec.Spec`, ``Process``, ``Mount``...)
  and the parsers (``parse_spec``, ``parse_process``, ``parse_resources``);
- :mod:`ocispec.capabilities` -- capability names and numbers, the five sets as bitmasks;
- :mod:`ocispec.seccomp` -- ``linux.seccomp`` compiled to a classic BPF program;
  :mod:`ocispec.syscall_table` its syscall numbers;
- :mod:`ocispec.linux` -- the kernel's values for the spec's names (clone and mount flags);
- :mod:`ocispec.document` -- the documents as bytes: size bound and JSON decoding;
- :mod:`ocispec.errors` -- :class:`~ocispec.errors.SpecError`, the one error raised here.

The guest imports this package at every container start under TCG emulation, where each
import costs tens of milliseconds: it imports only small stdlib modules (no dataclasses,
typing or re at run time), and this ``__init__`` imports nothing.
"""
