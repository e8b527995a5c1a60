"""kvmeter's wire contract: generated protobuf messages (see kvmeter.proto, `make proto`)."""

from kvmeter.proto import kvmeter_pb2 as pb

SCHEMA_VERSION = 2  # IPMeasure.header: 1 = the original five-field message

__all__ = ["SCHEMA_VERSION", "pb"]
