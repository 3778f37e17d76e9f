"""The gateway's replica-role options (prefill/decode disaggregation): ``--prefill-replica``,
``--decode-replica`` beside ``--replica``, and the hand-off's settings."""

from __future__ import annotations

import argparse

from gateway.roles import BOTH, DECODE, PREFILL, PdSettings

_PD = PdSettings()


def add_pd_arguments(parser: argparse.ArgumentParser) -> None:
    pd = parser.add_argument_group(
        "prefill/decode disaggregation",
        "prefill replicas compute prompts and their first token, then hand the KV to a decode replica, which "
        "streams the rest (docs/ARCHITECTURE.md, 'Prefill/decode disaggregation')",
    )
    pd.add_argument("--prefill-replica", action="append", default=[], metavar="ADDR[,ADDR...]",
                    help="a replica that only prefills (stage addresses in layer order); repeatable")
    pd.add_argument("--decode-replica", action="append", default=[], metavar="ADDR[,ADDR...]",
                    help="a replica that only continues hand-offs from prefill replicas; repeatable")
    pd.add_argument("--pd-min-prefill-tokens", type=int, default=_PD.min_prefill_tokens,
                    help="send a request straight to its decode replica when that replica caches all of its "
                    "prompt but at most this many tokens (default: %(default)s)")
    pd.add_argument("--pd-lease", type=float, default=_PD.lease_s,
                    help="seconds a hand-off may hold KV blocks on either replica; its transfer must finish "
                    "within it, else the decode replica prefills itself (default: %(default)s)")


def replicas_with_roles(args: argparse.Namespace) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """Every replica's stage addresses and its role, --replica ones first; roles are empty when
    no replica has a role of its own. ValueError when a value names no address or none is given."""
    from gateway.cli import parse_replicas

    groups = [(args.replica, BOTH), (args.prefill_replica, PREFILL), (args.decode_replica, DECODE)]
    replicas: list[tuple[str, ...]] = []
    roles: list[str] = []
    for values, role in groups:
        for addresses in parse_replicas(values):
            replicas.append(tuple(addresses))
            roles.append(role)
    return tuple(replicas), tuple(roles) if set(roles) != {BOTH} else ()
