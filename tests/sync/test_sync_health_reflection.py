"""Standard gRPC tooling works: health checking (grpc_health_probe style) and server reflection."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sync_service.config import RoundConfig
from sync_service.proto import SERVICE_NAME


def _channel(coordinator) -> grpc.Channel:  # type: ignore[no-untyped-def]
    return grpc.secure_channel(coordinator.target, grpc.ssl_channel_credentials(coordinator.tls.cert_pem))


def test_health_check_reports_serving_without_credentials(coordinator_factory) -> None:
    coordinator = coordinator_factory(["a"], RoundConfig(min_devices=1))
    with _channel(coordinator) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
            raise AssertionError("unknown service must be NOT_FOUND")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_and_describes_the_contract(coordinator_factory) -> None:
    coordinator = coordinator_factory(["a"], RoundConfig(min_devices=1))
    with _channel(coordinator) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    contract = next(f for f in files if f.name == "comigs/sync/v1/sync.proto")
    assert contract.package == "comigs.sync.v1"
    methods = {m.name for m in contract.service[0].method}
    assert methods == {
        "RegisterDevice",
        "GetTask",
        "DownloadGeneralist",
        "AcquireUploadSlot",
        "UploadDelta",
        "ReportMetrics",
    }
