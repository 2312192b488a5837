"""The host<->guest contract, imported by both sides: the gRPC protocol, limits, version, channel.

The host (``sandbox``) imports only this package of the guest's code, never ``agent``.
"""
