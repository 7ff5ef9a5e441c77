"""The key admin API (`nexus.authz.v1.KeyAdminService`, protos/nexus/authz/v1/keys.proto) on grpc.aio.

Served on the policy API's listener beside PolicyService, with the same admin token check, the same
error handling and the same per-method call counts (it borrows them from the `PolicyApi` servicer).
It translates messages to `runtime_keys.RuntimeKeys` operations and back, and nothing else. A secret
appears only in the CreateKey and RotateKey answers; error messages pass through the log scrubber.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import grpc
from redis.exceptions import RedisError

from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import keys_pb2_grpc as pb_grpc
from nexus_authz.adapters.policy_api import ApiError, PolicyApi, _rpc, _timestamp
from nexus_authz.core import runtime_keys as rk
from nexus_authz.core.runtime_keys import KeyChanges, KeySpec, RuntimeKey, RuntimeKeyError
from nexus_authz.runtime_keys import RuntimeKeys

__all__ = ["SERVICE", "KeyAdminApi", "add_to_server", "key_message"]

SERVICE = pb.DESCRIPTOR.services_by_name["KeyAdminService"].full_name
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
}
_ROTATION = {
    "none": pb.ROTATION_STATE_NONE,
    "grace": pb.ROTATION_STATE_GRACE,
    "expired": pb.ROTATION_STATE_EXPIRED,
}


def key_message(key: RuntimeKey, now: float) -> pb.RuntimeKey:
    """A runtime key as the API shows it: never a hash."""
    msg = pb.RuntimeKey(
        id=key.key_id,
        tenant=key.tenant,
        group=key.group,
        plan=key.plan or "",
        models=list(key.models),
        paths=list(key.paths),
        limits_json=key.limits,
        disabled=key.disabled,
        metadata=dict(key.metadata),
        credential=key.credential or "",
        rotation=_ROTATION[rk.rotation_state(key, now)],
        version=key.version,
        created_at=_timestamp(key.created_at),
        updated_at=_timestamp(key.updated_at),
    )
    if key.expires_at is not None:
        msg.expires_at.CopyFrom(_timestamp(key.expires_at))
    if key.previous_hash is not None and key.grace_until is not None:
        msg.grace_until.CopyFrom(_timestamp(key.grace_until))
    return msg


def _when(msg: Any, name: str) -> float | None:
    return getattr(msg, name).ToNanoseconds() / 1e9 if msg.HasField(name) else None


class KeyAdminApi(pb_grpc.KeyAdminServiceServicer):
    """KeyAdminService; `policy` is the PolicyService servicer whose token check and counts it shares."""

    def __init__(self, policy: PolicyApi) -> None:
        self.policy = policy
        self.engine = policy.engine

    # what `_rpc` needs, from the policy servicer
    def authorized(self, context: grpc.aio.ServicerContext) -> bool:
        return self.policy.authorized(context)

    def note_rejected(self, context: grpc.aio.ServicerContext) -> None:
        self.policy.note_rejected(context)

    def count(self, method: str, code: grpc.StatusCode) -> None:
        self.policy.count(method, code)

    @property
    def runtime(self) -> RuntimeKeys:
        runtime: RuntimeKeys | None = self.engine.runtime
        if runtime is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "runtime keys are off (keys.runtime: none)")
        return runtime

    async def _do(self, op: Any) -> Any:
        try:
            return await op
        except RuntimeKeyError as exc:
            raise ApiError(_CODES.get(exc.kind, grpc.StatusCode.INVALID_ARGUMENT), exc.message) from None
        except (RedisError, OSError, sqlite3.Error) as exc:
            kind = self.runtime.store.kind
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE, f"the runtime key store ({kind}) is unavailable: {exc}"
            ) from None

    def _now(self) -> float:
        return self.engine.clock()

    # -- methods ---------------------------------------------------------------------------------------
    @_rpc
    async def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateKeyResponse:
        spec = KeySpec(
            key_id=request.id,
            tenant=request.tenant or "default",
            group=request.group,
            plan=request.plan or None,
            models=tuple(request.models),
            paths=tuple(request.paths),
            limits=request.limits_json or "[]",
            expires_at=_when(request, "expires_at"),
            disabled=request.disabled,
            metadata=tuple(request.metadata.items()),
            credential=request.credential or None,
        )
        key, secret = await self._do(self.runtime.create(spec))
        return pb.CreateKeyResponse(key=key_message(key, self._now()), secret=secret)

    @_rpc
    async def RotateKey(
        self, request: pb.RotateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateKeyResponse:
        grace = request.grace.ToNanoseconds() / 1e9 if request.HasField("grace") else 0.0
        key, secret = await self._do(self.runtime.rotate(request.id, grace=grace))
        return pb.RotateKeyResponse(key=key_message(key, self._now()), secret=secret)

    @_rpc
    async def UpdateKey(
        self, request: pb.UpdateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateKeyResponse:
        def opt(name: str) -> Any:
            return getattr(request, name) if request.HasField(name) else None

        changes = KeyChanges(
            tenant=opt("tenant"),
            group=opt("group"),
            plan=opt("plan"),
            models=tuple(request.models) if request.set_models else None,
            paths=tuple(request.paths) if request.set_paths else None,
            limits=opt("limits_json"),
            expires_at=_when(request, "expires_at"),
            clear_expiry=request.clear_expiry,
            disabled=opt("disabled"),
            metadata=tuple(request.metadata.items()) if request.set_metadata else None,
            credential=opt("credential"),
        )
        key = await self._do(self.runtime.update(request.id, changes))
        return pb.UpdateKeyResponse(key=key_message(key, self._now()))

    @_rpc
    async def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeKeyResponse:
        key = await self._do(self.runtime.revoke(request.id))
        return pb.RevokeKeyResponse(key=key_message(key, self._now()))

    @_rpc
    async def RestoreKey(
        self, request: pb.RestoreKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RestoreKeyResponse:
        key = await self._do(self.runtime.restore(request.id))
        return pb.RestoreKeyResponse(key=key_message(key, self._now()))

    @_rpc
    async def ListRuntimeKeys(
        self, request: pb.ListRuntimeKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRuntimeKeysResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"page_size: 1 to {MAX_PAGE_SIZE}")
        runtime = self.runtime
        page, more = await self._do(runtime.page(request.tenant, request.page_token, size))
        now = self._now()
        return pb.ListRuntimeKeysResponse(
            keys=[key_message(k, now) for k in page],
            next_page_token=page[-1].key_id if more else "",
            version=runtime.synced,
        )


def add_to_server(server: grpc.aio.Server, policy: PolicyApi) -> KeyAdminApi:
    servicer = KeyAdminApi(policy)
    pb_grpc.add_KeyAdminServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer
