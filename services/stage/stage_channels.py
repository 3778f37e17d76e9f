"""gRPC channels from this stage to other stages, kept per address for the control calls of
KV transfers (reserve, commit, GetInfo, SendKvBlocks, the gRPC push): a fresh channel per call cost a
connection set-up each, a large share of a transfer's fixed cost (docs/benchmarks.md, "KV transfer between
replicas").

A kept channel whose connection failed (the stage died or was replaced on the same
address) is in TRANSIENT_FAILURE and would make the next call wait out gRPC's reconnect
back-off; such a channel is dropped and the call goes out on a fresh one, so a replaced
stage is reachable as soon as it serves. Each channel has a subchannel of its own (no
shared pool) for the same reason."""

from __future__ import annotations

import asyncio
import re

import grpc

from stagekit.errors import InvalidRequest
from stagekit.rpc.channels import stage_channel
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.pb import stage_pb2_grpc
from stagekit.rpc.status import error_for

CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
_STALE = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)
# host:port, host a name, an IPv4 address or a bracketed IPv6 one: what the Stage API's callers send
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")


def check_address(address: str) -> str:
    """``address`` if it is a stage address (``host:port``), else `InvalidRequest`: an address a
    caller sent must not reach gRPC's channel constructor, which fails on it with UNKNOWN."""
    if not _ADDRESS.fullmatch(address) or not 0 < int(address.rsplit(":", 1)[1]) < 65536:
        raise InvalidRequest(f"{address[:100]!r} is not a stage address (host:port)")
    return address


class StageChannels:
    """Invariant: at most one open channel per address; closed channels are never used."""

    def __init__(self, creds: MeshCredentials = PLAINTEXT) -> None:
        self.creds = creds
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()

    def channel(self, address: str) -> grpc.aio.Channel:
        """The kept channel to ``address`` (a fresh one if it has none or its connection failed)."""
        ch = self._channels.get(check_address(address))
        if ch is not None and ch.get_state(try_to_connect=False) in _STALE:
            self._channels.pop(address)
            self._retire(ch)
            ch = None
        if ch is None:
            ch = self._channels[address] = stage_channel(address, self.creds, CHANNEL_OPTIONS)
        return ch

    async def call(self, address: str, method: str, request: object, timeout: float = 120.0) -> object:
        """A unary Stage call to the stage at ``address``; its failure as our typed error."""
        try:
            return await getattr(stage_pb2_grpc.StageStub(self.channel(address)), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise error_for(e.code(), f"stage {address}: {e.details()}") from None

    def _retire(self, ch: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(ch.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
