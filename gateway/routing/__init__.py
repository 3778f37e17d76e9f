"""Routing policies: which healthy replica with room serves the next request.

`make_router` builds one by name (``--routing``); every policy sees the same candidates
(healthy, not yet tried for this request, with room) and the request's prompt token ids.
"""

from __future__ import annotations

from gateway.routing.base import Router
from gateway.routing.least_loaded import LeastLoadedRouter
from gateway.routing.prefix import PrefixRouter
from gateway.routing.prefix_index import PrefixIndex
from gateway.routing.round_robin import RoundRobinRouter

__all__ = ["LeastLoadedRouter", "PrefixIndex", "PrefixRouter", "RoundRobinRouter", "Router", "make_router"]


def make_router(policy: str, index: PrefixIndex) -> Router:
    """The router for ``policy``; the prefix router shares the pool's prefix index."""
    if policy == "round_robin":
        return RoundRobinRouter()
    if policy == "least_loaded":
        return LeastLoadedRouter()
    if policy == "prefix":
        return PrefixRouter(index)
    raise ValueError(f"unknown routing policy {policy!r}")
