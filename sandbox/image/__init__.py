"""OCI images for ``pysandbox run``: resolution, layouts and archives, safe unpacking, the store."""
