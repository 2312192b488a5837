"""The ``pysandbox`` command line: argument parsers and thin verbs that delegate to the library."""
