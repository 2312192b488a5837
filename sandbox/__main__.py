"""``python -m sandbox`` is the ``pysandbox`` command."""

from sandbox.cli import main

main()
