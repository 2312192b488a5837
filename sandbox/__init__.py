"""pysandbox's host runtime. A map of the folders (details in docs/design.md):

- ``cli/``: the ``pysandbox`` command line (parsers and thin verbs);
- ``runtime/``: the runc-compatible container lifecycle, container records, the host shim;
- ``run/``: ``pysandbox run`` (foreground and detached) and its default spec;
- ``pod/``: one VM per pod: its lifecycle, templates, agent client and proxy, sharing, network;
- ``image/``: OCI images for ``run``: resolution, formats, safe unpacking, the store;
- ``store.py`` (persisted state under ``--root``), ``errors.py`` (the error tree), ``check.py``.
"""

from pathlib import Path

#: The directory holding the ``sandbox``, ``agentapi`` and ``hypervisor`` packages: the
#: ``PYTHONPATH`` of the host processes pysandbox starts (shims, proxies, monitors).
IMPORT_ROOT = str(Path(__file__).resolve().parent.parent)
