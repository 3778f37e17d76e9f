"""The admin API under ``/admin`` (on the REST port): replicas and stages changed at runtime.

Off unless the gateway has an admin key (``--admin-api-key`` / ``--admin-api-key-file``): then
every call needs ``Authorization: Bearer KEY`` with one of those keys (401 otherwise; the client
API keys of ``/v1`` do not open it, nor does an admin key open ``/v1``). The work is
`ReplicaAdmin`'s; this module parses, authorises, counts (`stagemesh_admin_operations_total`)
and renders. Routes stay out of the OpenAPI document, which describes the client API.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse

from gateway.auth import ApiKeys
from gateway.errors import Unauthorized, face_of
from gateway.replica_admin import ReplicaAdmin, check_timeout
from gateway.state import GatewayState, get_state
from stagekit.errors import InvalidRequest, StagemeshError

DEFAULT_TIMEOUT_S = 30.0  # for in-flight requests to finish before they are moved


def _admin_key_check(keys: ApiKeys) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise Unauthorized("Incorrect admin API key provided.")

    return check


async def _admin(state: GatewayState = Depends(get_state)) -> ReplicaAdmin:
    assert state.admin is not None  # the router is mounted only with an admin key, and the lifespan sets it
    return state.admin


async def _counted(state: GatewayState, op: str, work: Awaitable[Any]) -> Any:
    try:
        result = await work
    except StagemeshError as err:
        state.metrics.admin_operations.labels(op=op, outcome=str(face_of(err).status_code)).inc()
        raise
    state.metrics.admin_operations.labels(op=op, outcome="ok").inc()
    return result


def _field(body: Any, name: str) -> Any:
    if isinstance(body, (bytes, str)):  # FastAPI leaves a body not sent as JSON (curl -d: form-encoded) raw
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest(f"the body must be a JSON object with {name!r}") from None
    if not isinstance(body, dict) or name not in body:
        raise InvalidRequest(f"the body must be a JSON object with {name!r}")
    return body[name]


def admin_router(keys: ApiKeys) -> APIRouter:
    router = APIRouter(prefix="/admin", dependencies=[Depends(_admin_key_check(keys))], include_in_schema=False)

    @router.get("/replicas")
    async def list_replicas(state: GatewayState = Depends(get_state)) -> dict[str, Any]:
        return {"replicas": state.pool.snapshot(), "dp_groups": state.pool.dp_groups.snapshot()}

    @router.get("/replicas/{replica_id}")
    async def get_replica(replica_id: str, admin: ReplicaAdmin = Depends(_admin)) -> dict[str, Any]:
        return admin.describe(admin.replica(replica_id))

    @router.post("/replicas")
    async def add_replica(
        body: Any = Body(None), admin: ReplicaAdmin = Depends(_admin), state: GatewayState = Depends(get_state)
    ) -> JSONResponse:
        async def work() -> dict[str, Any]:
            return admin.describe(await admin.add(_field(body, "stages")))

        return JSONResponse(await _counted(state, "add", work()), status_code=202)

    @router.post("/replicas/{replica_id}/drain")
    async def drain(
        replica_id: str, admin: ReplicaAdmin = Depends(_admin), state: GatewayState = Depends(get_state)
    ) -> dict[str, Any]:
        async def work() -> dict[str, Any]:
            replica = admin.replica(replica_id)
            admin.drain(replica)
            return admin.describe(replica)

        return await _counted(state, "drain", work())

    @router.post("/replicas/{replica_id}/resume")
    async def resume(
        replica_id: str, admin: ReplicaAdmin = Depends(_admin), state: GatewayState = Depends(get_state)
    ) -> dict[str, Any]:
        async def work() -> dict[str, Any]:
            replica = admin.replica(replica_id)
            admin.drain(replica, on=False)
            return admin.describe(replica)

        return await _counted(state, "resume", work())

    @router.delete("/replicas/{replica_id}")
    async def remove(
        replica_id: str,
        timeout: float | None = Query(None, description="seconds in-flight requests get before they are moved"),
        admin: ReplicaAdmin = Depends(_admin),
        state: GatewayState = Depends(get_state),
    ) -> dict[str, Any]:
        async def work() -> dict[str, Any]:
            replica = admin.replica(replica_id)
            moved = await admin.remove(replica, check_timeout(timeout, DEFAULT_TIMEOUT_S))
            return {"id": replica.id, "removed": True, "moved_requests": moved}

        return await _counted(state, "remove", work())

    @router.put("/replicas/{replica_id}/stages/{index}")
    async def replace_stage(
        replica_id: str,
        index: int,
        body: Any = Body(None),
        timeout: float | None = Query(None, description="seconds in-flight requests get before they are moved"),
        admin: ReplicaAdmin = Depends(_admin),
        state: GatewayState = Depends(get_state),
    ) -> dict[str, Any]:
        async def work() -> dict[str, Any]:
            replica = admin.replica(replica_id)
            moved = await admin.replace_stage(
                replica, index, _field(body, "address"), check_timeout(timeout, DEFAULT_TIMEOUT_S)
            )
            return {**admin.describe(replica), "moved_requests": moved}

        return await _counted(state, "replace_stage", work())

    return router
