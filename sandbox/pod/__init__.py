"""Pods: one VM each (QEMU, virtiofsd, agent proxy), templates, agent client, sharing, network."""
