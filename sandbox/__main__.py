"""``python -m sandbox`` is the ``pysandbox`` command."""

from sandbox.cli.entry import main

main()
