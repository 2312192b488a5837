"""``python -m sandbox`` is the ``pysandbox`` command."""

from sandbox.cli.main import main

main()
