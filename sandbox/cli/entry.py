"""The ``pysandbox`` command's entry point (the console script and ``python -m sandbox``).

Loading the command line takes ~0.1 s; a Ctrl-C in that time raised KeyboardInterrupt inside
an ``import`` and printed a traceback (breaker4). Here the load is guarded: such a Ctrl-C ends
the command as one later does, status 130 and no output (:func:`sandbox.cli.main.main`).
"""

import sys


def main() -> None:
    try:
        from sandbox.cli.main import main as run
    except KeyboardInterrupt:
        sys.exit(130)
    run()
