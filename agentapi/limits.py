"""Bounds shared by host and guest: message sizes and timeouts of the agent channel.

Both ends apply these so that neither side can be made to buffer without limit by the
other: the host's grpcio channels through :data:`GRPC_OPTIONS`, the guest agent's server
(agent/grpc_server.py) and the host's proxy (sandbox/pod/grpc_call.py) by checking each
message's 5-byte header against :data:`MAX_MESSAGE_BYTES`. The guest is untrusted, so the
host applies them to every call.
"""

#: Largest gRPC message either side accepts or sends.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: Largest file the ReadFile RPC returns in one reply.
MAX_READ_BYTES = 1024 * 1024

#: Default deadline of a control RPC, seconds.
DEFAULT_RPC_TIMEOUT = 10.0

#: Longest line accepted while resynchronising the serial channel (bytes scanned are unbounded
#: in count but only this many are buffered at once).
SYNC_WINDOW_BYTES = 256

#: grpcio options of every host-side agent channel (and of grpcio servers in the tests).
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", 16 * 1024),
]
