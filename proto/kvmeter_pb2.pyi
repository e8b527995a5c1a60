from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

ACTION: EventCategory
ASYNC_JOB: EventCategory
CONTROL: TrafficType
CRASHED: DomainState
DESCRIPTOR: _descriptor.FileDescriptor
DIRECTION_UNSPECIFIED: Direction
DOMAIN_KIND_OTHER: DomainKind
DOMAIN_STATE_UNKNOWN: DomainState
EVENT_CATEGORY_UNKNOWN: EventCategory
GONE: DomainState
GUEST: TrafficType
MANAGEMENT: TrafficType
PAUSED: DomainState
PRIVATE_GATEWAY: TrafficType
PUBLIC: TrafficType
RESOURCE_STATE: EventCategory
RUNNING: DomainState
SHUTOFF: DomainState
STORAGE: TrafficType
SYSTEM_VM: DomainKind
TRAFFIC_UNKNOWN: TrafficType
USAGE: EventCategory
USER_VM: DomainKind
VIRTUAL_ROUTER: DomainKind
VM_RX: Direction
VM_TX: Direction

class DomainInventory(_message.Message):
    __slots__ = ["account_id", "kind", "name", "nics", "owner", "state", "uuid", "vm_id"]
    class OwnerEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NICS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    kind: DomainKind
    name: str
    nics: _containers.RepeatedCompositeFieldContainer[NicInventory]
    owner: _containers.ScalarMap[str, str]
    state: DomainState
    uuid: str
    vm_id: str
    def __init__(self, uuid: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[DomainState, str]] = ..., kind: _Optional[_Union[DomainKind, str]] = ..., account_id: _Optional[str] = ..., vm_id: _Optional[str] = ..., owner: _Optional[_Mapping[str, str]] = ..., nics: _Optional[_Iterable[_Union[NicInventory, _Mapping]]] = ...) -> None: ...

class IPMeasure(_message.Message):
    __slots__ = ["address", "bridge", "bytes", "device", "direction", "domain_name", "end", "final_at_delete", "header", "ifindex", "instance_uuid", "mac", "packets", "quarantine_reason", "quarantined", "saddr", "start", "traffic_type", "vlan_id", "vxlan_vni", "wrapped"]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_NAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    FINAL_AT_DELETE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    IFINDEX_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_UUID_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_REASON_FIELD_NUMBER: _ClassVar[int]
    SADDR_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_TYPE_FIELD_NUMBER: _ClassVar[int]
    VLAN_ID_FIELD_NUMBER: _ClassVar[int]
    VXLAN_VNI_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    address: bytes
    bridge: str
    bytes: int
    device: str
    direction: Direction
    domain_name: str
    end: int
    final_at_delete: bool
    header: int
    ifindex: int
    instance_uuid: str
    mac: str
    packets: int
    quarantine_reason: str
    quarantined: bool
    saddr: int
    start: int
    traffic_type: TrafficType
    vlan_id: int
    vxlan_vni: int
    wrapped: bool
    def __init__(self, header: _Optional[int] = ..., saddr: _Optional[int] = ..., bytes: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., direction: _Optional[_Union[Direction, str]] = ..., packets: _Optional[int] = ..., address: _Optional[bytes] = ..., traffic_type: _Optional[_Union[TrafficType, str]] = ..., vlan_id: _Optional[int] = ..., vxlan_vni: _Optional[int] = ..., bridge: _Optional[str] = ..., device: _Optional[str] = ..., mac: _Optional[str] = ..., instance_uuid: _Optional[str] = ..., domain_name: _Optional[str] = ..., ifindex: _Optional[int] = ..., final_at_delete: bool = ..., wrapped: bool = ..., quarantined: bool = ..., quarantine_reason: _Optional[str] = ...) -> None: ...

class LifecycleEvent(_message.Message):
    __slots__ = ["account_is_owner", "account_uuid", "attributes", "category", "delivery_seq", "delivery_source", "event_id", "event_type", "ip_address", "mac", "network_uuid", "offering_uuid", "resource_type", "resource_uuid", "status", "time", "zone_uuid"]
    class AttributesEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACCOUNT_IS_OWNER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_UUID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_SEQ_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    NETWORK_UUID_FIELD_NUMBER: _ClassVar[int]
    OFFERING_UUID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_UUID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ZONE_UUID_FIELD_NUMBER: _ClassVar[int]
    account_is_owner: bool
    account_uuid: str
    attributes: _containers.ScalarMap[str, str]
    category: EventCategory
    delivery_seq: int
    delivery_source: str
    event_id: str
    event_type: str
    ip_address: str
    mac: str
    network_uuid: str
    offering_uuid: str
    resource_type: str
    resource_uuid: str
    status: str
    time: int
    zone_uuid: str
    def __init__(self, event_id: _Optional[str] = ..., category: _Optional[_Union[EventCategory, str]] = ..., event_type: _Optional[str] = ..., resource_type: _Optional[str] = ..., resource_uuid: _Optional[str] = ..., account_uuid: _Optional[str] = ..., account_is_owner: bool = ..., zone_uuid: _Optional[str] = ..., time: _Optional[int] = ..., status: _Optional[str] = ..., offering_uuid: _Optional[str] = ..., ip_address: _Optional[str] = ..., mac: _Optional[str] = ..., network_uuid: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., delivery_source: _Optional[str] = ..., delivery_seq: _Optional[int] = ...) -> None: ...

class MeasureBatch(_message.Message):
    __slots__ = ["boot_id", "final", "host_id", "inventory", "measures", "poll_time", "schema", "seq", "stream_id"]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    MEASURES_FIELD_NUMBER: _ClassVar[int]
    POLL_TIME_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    final: bool
    host_id: str
    inventory: _containers.RepeatedCompositeFieldContainer[DomainInventory]
    measures: _containers.RepeatedCompositeFieldContainer[IPMeasure]
    poll_time: int
    schema: int
    seq: int
    stream_id: str
    def __init__(self, schema: _Optional[int] = ..., host_id: _Optional[str] = ..., boot_id: _Optional[str] = ..., stream_id: _Optional[str] = ..., seq: _Optional[int] = ..., poll_time: _Optional[int] = ..., measures: _Optional[_Iterable[_Union[IPMeasure, _Mapping]]] = ..., inventory: _Optional[_Iterable[_Union[DomainInventory, _Mapping]]] = ..., final: bool = ...) -> None: ...

class NicInventory(_message.Message):
    __slots__ = ["bridge", "device", "ifindex", "mac", "model", "network", "nic_type", "traffic_type", "vlan_id", "vxlan_vni"]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IFINDEX_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    NIC_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_TYPE_FIELD_NUMBER: _ClassVar[int]
    VLAN_ID_FIELD_NUMBER: _ClassVar[int]
    VXLAN_VNI_FIELD_NUMBER: _ClassVar[int]
    bridge: str
    device: str
    ifindex: int
    mac: str
    model: str
    network: str
    nic_type: str
    traffic_type: TrafficType
    vlan_id: int
    vxlan_vni: int
    def __init__(self, mac: _Optional[str] = ..., device: _Optional[str] = ..., bridge: _Optional[str] = ..., network: _Optional[str] = ..., model: _Optional[str] = ..., nic_type: _Optional[str] = ..., traffic_type: _Optional[_Union[TrafficType, str]] = ..., vlan_id: _Optional[int] = ..., vxlan_vni: _Optional[int] = ..., ifindex: _Optional[int] = ...) -> None: ...

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class TrafficType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class DomainState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class DomainKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class EventCategory(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
