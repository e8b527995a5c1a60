"""The one exception the collector's pure core raises for input it rejects.

Adapters catch `BadInput`, dead-letter the raw bytes with `reason` and keep going.
"""

from __future__ import annotations

# Machine-readable reasons. Adapters store them verbatim; keep them stable.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_EVENT = "unknown_event"  # no known category matches the keys present
MISSING_RESOURCE = "missing_resource"  # a usage / state event without a resource uuid
WRONG_TYPE = "wrong_type"  # a field of a JSON type CloudStack never sends there
OVERSIZED_EVENT = "oversized_event"  # an event over the configured size limit
MALFORMED_PROTOBUF = "malformed_protobuf"
MISSING_STREAM = "missing_stream"
MISSING_SEQ = "missing_seq"
MISSING_INTERVAL = "missing_interval"
INVERTED_INTERVAL = "inverted_interval"
IMPLAUSIBLE_INTERVAL = "implausible_interval"
BAD_ADDRESS = "bad_address"
BAD_TEXT = "bad_text"  # a protobuf string field that is not UTF-8
BAD_SEQ = "bad_seq"  # a sequence number past what the store keeps (int64)
IMPLAUSIBLE_BYTES = "implausible_bytes"  # a byte count past what the store keeps (int64)
BAD_WINDOW = "bad_window"
NEGATIVE_BYTES = "negative_bytes"
BAD_DIRECTION = "bad_direction"
UNKNOWN_USAGE_TYPE = "unknown_usage_type"


class BadInput(Exception):
    """Input the core cannot accept: `reason` is a stable code, `message` says what and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
