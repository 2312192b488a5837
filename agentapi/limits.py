"""Bounds shared by host and guest: message sizes and timeouts of the agent channel.

Both ends configure gRPC with these so that neither side can be made to buffer without
limit by the other. The guest is untrusted, so the host applies them to every call.
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

#: gRPC options applied to every agent channel and server.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", 16 * 1024),
]
