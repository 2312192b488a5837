"""Hypervisor layer of pysandbox: boot and control one QEMU VM per pod.

Modules::

    errors      exception tree (HypervisorError and subclasses)
    qemu_args   QEMU options as typed values; VMConfig; build_argv()
    accel       KVM-or-TCG detection (detect(), has_vhost_vsock())
    base        the Hypervisor interface (start/resume/status/stop/kill/pids)
    qemu        QemuVM: spawn, QMP control, soft-then-hard stop, attach by pid
    qmp         synchronous QMP client with timeouts
    virtiofsd   Virtiofsd: one virtio-fs daemon per share
    process     pid + start-time handles usable from any process

Import the submodule you need; this package imports nothing eagerly (the CLI stays fast).
"""
