"""pysandbox's host runtime. A map of the folders (details in docs/design.md):

- ``cli/``: the ``pysandbox`` command line (parsers and thin verbs);
- ``runtime/``: the runc-compatible container lifecycle, container records, the host shim;
- ``run/``: ``pysandbox run`` (foreground and detached) and its default spec;
- ``pod/``: one VM per pod: its lifecycle, templates, agent client and proxy, sharing, network;
- ``image/``: OCI images for ``run``: resolution, formats, safe unpacking, the store;
- ``store.py`` (persisted state under ``--root``), ``errors.py`` (the error tree), ``check.py``.
"""

import os.path

#: The directory holding the ``sandbox``, ``agentapi`` and ``hypervisor`` packages: the
#: ``PYTHONPATH`` of the host processes pysandbox starts (shims, proxies, monitors). No
#: pathlib here: a run's shim watcher imports this package and nothing else (1.7 MiB less).
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
