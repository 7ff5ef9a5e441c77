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

class RotationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROTATION_STATE_UNSPECIFIED: _ClassVar[RotationState]
    ROTATION_STATE_NONE: _ClassVar[RotationState]
    ROTATION_STATE_GRACE: _ClassVar[RotationState]
    ROTATION_STATE_EXPIRED: _ClassVar[RotationState]
ROTATION_STATE_UNSPECIFIED: RotationState
ROTATION_STATE_NONE: RotationState
ROTATION_STATE_GRACE: RotationState
ROTATION_STATE_EXPIRED: RotationState

class RuntimeKey(_message.Message):
    __slots__ = ("id", "tenant", "group", "plan", "models", "paths", "limits_json", "expires_at", "disabled", "metadata", "credential", "rotation", "grace_until", "version", "created_at", "updated_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    GRACE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    group: str
    plan: str
    models: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    limits_json: str
    expires_at: _timestamp_pb2.Timestamp
    disabled: bool
    metadata: _containers.ScalarMap[str, str]
    credential: str
    rotation: RotationState
    grace_until: _timestamp_pb2.Timestamp
    version: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., group: _Optional[str] = ..., plan: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., limits_json: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., disabled: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ..., credential: _Optional[str] = ..., rotation: _Optional[_Union[RotationState, str]] = ..., grace_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("id", "tenant", "group", "plan", "models", "paths", "limits_json", "expires_at", "disabled", "metadata", "credential")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    group: str
    plan: str
    models: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    limits_json: str
    expires_at: _timestamp_pb2.Timestamp
    disabled: bool
    metadata: _containers.ScalarMap[str, str]
    credential: str
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., group: _Optional[str] = ..., plan: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., limits_json: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., disabled: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ..., credential: _Optional[str] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: RuntimeKey
    secret: str
    def __init__(self, key: _Optional[_Union[RuntimeKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("id", "grace")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    id: str
    grace: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: RuntimeKey
    secret: str
    def __init__(self, key: _Optional[_Union[RuntimeKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class UpdateKeyRequest(_message.Message):
    __slots__ = ("id", "tenant", "group", "plan", "models", "set_models", "paths", "set_paths", "limits_json", "expires_at", "clear_expiry", "disabled", "metadata", "set_metadata", "credential")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SET_MODELS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    SET_PATHS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CLEAR_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SET_METADATA_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    group: str
    plan: str
    models: _containers.RepeatedScalarFieldContainer[str]
    set_models: bool
    paths: _containers.RepeatedScalarFieldContainer[str]
    set_paths: bool
    limits_json: str
    expires_at: _timestamp_pb2.Timestamp
    clear_expiry: bool
    disabled: bool
    metadata: _containers.ScalarMap[str, str]
    set_metadata: bool
    credential: str
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., group: _Optional[str] = ..., plan: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., set_models: _Optional[bool] = ..., paths: _Optional[_Iterable[str]] = ..., set_paths: _Optional[bool] = ..., limits_json: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., clear_expiry: _Optional[bool] = ..., disabled: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ..., set_metadata: _Optional[bool] = ..., credential: _Optional[str] = ...) -> None: ...

class UpdateKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: RuntimeKey
    def __init__(self, key: _Optional[_Union[RuntimeKey, _Mapping]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: RuntimeKey
    def __init__(self, key: _Optional[_Union[RuntimeKey, _Mapping]] = ...) -> None: ...

class RestoreKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RestoreKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: RuntimeKey
    def __init__(self, key: _Optional[_Union[RuntimeKey, _Mapping]] = ...) -> None: ...

class ListRuntimeKeysRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRuntimeKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token", "version")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[RuntimeKey]
    next_page_token: str
    version: int
    def __init__(self, keys: _Optional[_Iterable[_Union[RuntimeKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
