"""The runc-compatible container runtime: lifecycle verbs, container records, the host shim."""
