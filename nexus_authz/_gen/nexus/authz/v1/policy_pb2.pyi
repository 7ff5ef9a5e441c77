import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    KEY_STATE_ACTIVE: _ClassVar[KeyState]
    KEY_STATE_DISABLED: _ClassVar[KeyState]
    KEY_STATE_EXPIRED: _ClassVar[KeyState]

class LimitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIMIT_KIND_UNSPECIFIED: _ClassVar[LimitKind]
    LIMIT_KIND_REQUESTS: _ClassVar[LimitKind]
    LIMIT_KIND_TOKENS: _ClassVar[LimitKind]
    LIMIT_KIND_USD: _ClassVar[LimitKind]
    LIMIT_KIND_CONCURRENT: _ClassVar[LimitKind]

class LimitAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIMIT_ALGORITHM_UNSPECIFIED: _ClassVar[LimitAlgorithm]
    LIMIT_ALGORITHM_GCRA: _ClassVar[LimitAlgorithm]
    LIMIT_ALGORITHM_SLIDING: _ClassVar[LimitAlgorithm]
    LIMIT_ALGORITHM_GAUGE: _ClassVar[LimitAlgorithm]
    LIMIT_ALGORITHM_CALENDAR: _ClassVar[LimitAlgorithm]

class UsageGroup(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUP_UNSPECIFIED: _ClassVar[UsageGroup]
    USAGE_GROUP_KEY: _ClassVar[UsageGroup]
    USAGE_GROUP_TENANT: _ClassVar[UsageGroup]
    USAGE_GROUP_MODEL: _ClassVar[UsageGroup]
    USAGE_GROUP_MINUTE: _ClassVar[UsageGroup]
    USAGE_GROUP_HOUR: _ClassVar[UsageGroup]
    USAGE_GROUP_DAY: _ClassVar[UsageGroup]
    USAGE_GROUP_SOURCE: _ClassVar[UsageGroup]
    USAGE_GROUP_PRICE_RULE: _ClassVar[UsageGroup]
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_ACTIVE: KeyState
KEY_STATE_DISABLED: KeyState
KEY_STATE_EXPIRED: KeyState
LIMIT_KIND_UNSPECIFIED: LimitKind
LIMIT_KIND_REQUESTS: LimitKind
LIMIT_KIND_TOKENS: LimitKind
LIMIT_KIND_USD: LimitKind
LIMIT_KIND_CONCURRENT: LimitKind
LIMIT_ALGORITHM_UNSPECIFIED: LimitAlgorithm
LIMIT_ALGORITHM_GCRA: LimitAlgorithm
LIMIT_ALGORITHM_SLIDING: LimitAlgorithm
LIMIT_ALGORITHM_GAUGE: LimitAlgorithm
LIMIT_ALGORITHM_CALENDAR: LimitAlgorithm
USAGE_GROUP_UNSPECIFIED: UsageGroup
USAGE_GROUP_KEY: UsageGroup
USAGE_GROUP_TENANT: UsageGroup
USAGE_GROUP_MODEL: UsageGroup
USAGE_GROUP_MINUTE: UsageGroup
USAGE_GROUP_HOUR: UsageGroup
USAGE_GROUP_DAY: UsageGroup
USAGE_GROUP_SOURCE: UsageGroup
USAGE_GROUP_PRICE_RULE: UsageGroup

class Key(_message.Message):
    __slots__ = ("id", "tenant", "plan", "state", "expires_at", "models", "paths", "credential", "metadata", "limits")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    plan: str
    state: KeyState
    expires_at: _timestamp_pb2.Timestamp
    models: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    credential: str
    metadata: _containers.ScalarMap[str, str]
    limits: _containers.RepeatedCompositeFieldContainer[Limit]
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., plan: _Optional[str] = ..., state: _Optional[_Union[KeyState, str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., models: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., credential: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., limits: _Optional[_Iterable[_Union[Limit, _Mapping]]] = ...) -> None: ...

class Limit(_message.Message):
    __slots__ = ("name", "kind", "limit", "period", "algorithm", "capacity", "slots", "shadow", "model", "level")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: LimitKind
    limit: int
    period: _duration_pb2.Duration
    algorithm: LimitAlgorithm
    capacity: int
    slots: int
    shadow: bool
    model: str
    level: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[LimitKind, str]] = ..., limit: _Optional[int] = ..., period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., algorithm: _Optional[_Union[LimitAlgorithm, str]] = ..., capacity: _Optional[int] = ..., slots: _Optional[int] = ..., shadow: _Optional[bool] = ..., model: _Optional[str] = ..., level: _Optional[str] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("version", "loaded_at", "keys", "file_error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FILE_ERROR_FIELD_NUMBER: _ClassVar[int]
    version: str
    loaded_at: _timestamp_pb2.Timestamp
    keys: int
    file_error: bool
    def __init__(self, version: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., keys: _Optional[int] = ..., file_error: _Optional[bool] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetKeyResponse(_message.Message):
    __slots__ = ("key", "snapshot")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    key: Key
    snapshot: SnapshotInfo
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ..., snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "tenant")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    tenant: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token", "total_size", "snapshot")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    next_page_token: str
    total_size: int
    snapshot: SnapshotInfo
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ..., snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ...) -> None: ...

class GetLimitStatusRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class WindowStatus(_message.Message):
    __slots__ = ("name", "kind", "limit", "capacity", "used", "remaining", "reset_after", "reset_at", "shadow", "model", "reserved", "period", "algorithm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_AFTER_FIELD_NUMBER: _ClassVar[int]
    RESET_AT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: LimitKind
    limit: int
    capacity: int
    used: int
    remaining: int
    reset_after: _duration_pb2.Duration
    reset_at: _timestamp_pb2.Timestamp
    shadow: bool
    model: str
    reserved: int
    period: _duration_pb2.Duration
    algorithm: LimitAlgorithm
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[LimitKind, str]] = ..., limit: _Optional[int] = ..., capacity: _Optional[int] = ..., used: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reset_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shadow: _Optional[bool] = ..., model: _Optional[str] = ..., reserved: _Optional[int] = ..., period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., algorithm: _Optional[_Union[LimitAlgorithm, str]] = ...) -> None: ...

class GetLimitStatusResponse(_message.Message):
    __slots__ = ("key_id", "windows", "reservations_in_flight", "as_of")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    windows: _containers.RepeatedCompositeFieldContainer[WindowStatus]
    reservations_in_flight: int
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., windows: _Optional[_Iterable[_Union[WindowStatus, _Mapping]]] = ..., reservations_in_flight: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("key_id", "tenant", "model", "start_time", "end_time", "group_by")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    model: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    group_by: _containers.RepeatedScalarFieldContainer[UsageGroup]
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[UsageGroup, str]]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("key_id", "tenant", "model", "period_start", "requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens", "cost_micro_usd", "first_minute", "last_minute", "source", "price_rule")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    FIRST_MINUTE_FIELD_NUMBER: _ClassVar[int]
    LAST_MINUTE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PRICE_RULE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    model: str
    period_start: _timestamp_pb2.Timestamp
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_micro_usd: int
    first_minute: _timestamp_pb2.Timestamp
    last_minute: _timestamp_pb2.Timestamp
    source: str
    price_rule: str
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., cost_micro_usd: _Optional[int] = ..., first_minute: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_minute: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., price_rule: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "total", "ledger_lag", "pending_rows")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LEDGER_LAG_FIELD_NUMBER: _ClassVar[int]
    PENDING_ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    total: UsageRow
    ledger_lag: _duration_pb2.Duration
    pending_rows: int
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., total: _Optional[_Union[UsageRow, _Mapping]] = ..., ledger_lag: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., pending_rows: _Optional[int] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("method", "path", "headers", "body", "key_id")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    headers: _containers.ScalarMap[str, str]
    body: bytes
    key_id: str
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("allowed", "http_status", "reason", "message", "key_id", "tenant", "model", "response_headers", "upstream_headers", "removed_headers", "credential", "error_body")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_HEADERS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_HEADERS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_HEADERS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_BODY_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    http_status: int
    reason: str
    message: str
    key_id: str
    tenant: str
    model: str
    response_headers: _containers.RepeatedCompositeFieldContainer[Header]
    upstream_headers: _containers.RepeatedCompositeFieldContainer[Header]
    removed_headers: _containers.RepeatedScalarFieldContainer[str]
    credential: str
    error_body: str
    def __init__(self, allowed: _Optional[bool] = ..., http_status: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., response_headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., upstream_headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., removed_headers: _Optional[_Iterable[str]] = ..., credential: _Optional[str] = ..., error_body: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("key_id", "model", "prompt_tokens", "completion_tokens", "total_tokens")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, key_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class LimitExplanation(_message.Message):
    __slots__ = ("name", "level", "kind", "limit", "capacity", "used", "remaining", "reset_after", "reset_at", "reserved", "shadow", "model", "period", "algorithm", "applies", "cost", "headroom", "would_refuse", "retry_after", "never_fits", "binding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_AFTER_FIELD_NUMBER: _ClassVar[int]
    RESET_AT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    APPLIES_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_FIELD_NUMBER: _ClassVar[int]
    WOULD_REFUSE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    NEVER_FITS_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    level: str
    kind: LimitKind
    limit: int
    capacity: int
    used: int
    remaining: int
    reset_after: _duration_pb2.Duration
    reset_at: _timestamp_pb2.Timestamp
    reserved: int
    shadow: bool
    model: str
    period: _duration_pb2.Duration
    algorithm: LimitAlgorithm
    applies: bool
    cost: int
    headroom: float
    would_refuse: bool
    retry_after: _duration_pb2.Duration
    never_fits: bool
    binding: bool
    def __init__(self, name: _Optional[str] = ..., level: _Optional[str] = ..., kind: _Optional[_Union[LimitKind, str]] = ..., limit: _Optional[int] = ..., capacity: _Optional[int] = ..., used: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reset_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reserved: _Optional[int] = ..., shadow: _Optional[bool] = ..., model: _Optional[str] = ..., period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., algorithm: _Optional[_Union[LimitAlgorithm, str]] = ..., applies: _Optional[bool] = ..., cost: _Optional[int] = ..., headroom: _Optional[float] = ..., would_refuse: _Optional[bool] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., never_fits: _Optional[bool] = ..., binding: _Optional[bool] = ...) -> None: ...

class LevelExplanation(_message.Message):
    __slots__ = ("level", "limits")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    level: str
    limits: _containers.RepeatedCompositeFieldContainer[LimitExplanation]
    def __init__(self, level: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[LimitExplanation, _Mapping]]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("key_id", "tenant", "group", "model", "prompt_tokens", "completion_tokens", "total_tokens", "cost_micro_usd", "levels", "binding", "binding_level", "decision", "reservations_in_flight", "as_of")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    BINDING_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    group: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micro_usd: int
    levels: _containers.RepeatedCompositeFieldContainer[LevelExplanation]
    binding: str
    binding_level: str
    decision: CheckResponse
    reservations_in_flight: int
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., group: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cost_micro_usd: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[LevelExplanation, _Mapping]]] = ..., binding: _Optional[str] = ..., binding_level: _Optional[str] = ..., decision: _Optional[_Union[CheckResponse, _Mapping]] = ..., reservations_in_flight: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
