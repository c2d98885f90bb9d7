"""Python code generated from `protos/comigs/sync/v1/sync.proto` (package `comigs.sync.v1`).

The generated modules are committed (``sync_pb2.py``, ``sync_pb2.pyi``, ``sync_pb2_grpc.py``) so that a
plain ``pip install`` needs no code generator; ``tests/sync/test_proto_regen.py`` regenerates them and
fails if they drift from the ``.proto``. Regenerate with ``python -m sync_service.proto.regen``.
"""

#: The fully qualified name of the service, as reflection and health checking report it.
SERVICE_NAME = "comigs.sync.v1.SyncService"
