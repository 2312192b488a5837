"""``pysandbox run``: one command, one fresh VM (foreground or detached), and its default spec."""
