"""Hypothesis strategies for bad protobuf messages, built from a message's descriptor: every field
unset or set to a boundary or odd value of its type (0, -1, the int32/int64 extremes, NaN and
infinities, the smallest float, empty and odd strings, unknown enum numbers), repeated fields
empty, short or huge, one member of each oneof, nested messages the same way. ``hints`` add
values a field should often get (real addresses, ids), so that generated messages also get past
the first checks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

INT32 = (0, 1, -1, 2, 7, 2**31 - 1, -(2**31))
INT64 = (*INT32, 2**63 - 1, -(2**63), 2**40)
FLOATS = (0.0, -0.0, 1.0, 0.5, -1.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, -3.4e38, 1e-8, 100.0, 100.5)
STRINGS = ("", "x", " ", "\x00", "é" * 3, "a" * 4097, "127.0.0.1:1", "[::1]:0", "localhost:", ":::", "\u202e")
HUGE = 100_000  # elements of a "huge" repeated field (see _huge): under gRPC's 4 MB message limit

_INTS = {FieldDescriptor.TYPE_INT32: (INT32, 32), FieldDescriptor.TYPE_SINT32: (INT32, 32),
         FieldDescriptor.TYPE_INT64: (INT64, 64), FieldDescriptor.TYPE_SINT64: (INT64, 64),
         FieldDescriptor.TYPE_UINT32: ((0, 1, 2**32 - 1), 32), FieldDescriptor.TYPE_UINT64: ((0, 1, 2**64 - 1), 64)}


def _scalar(field: FieldDescriptor, hints: Sequence[Any]) -> st.SearchStrategy[Any]:
    t = field.type
    hinted = [st.sampled_from(list(hints))] if hints else []
    if t in _INTS:
        edges, bits = _INTS[t]
        lo = 0 if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) else -(2 ** (bits - 1))
        hi = 2 ** bits - 1 if lo == 0 else 2 ** (bits - 1) - 1
        return st.one_of(*hinted, st.sampled_from(edges), st.integers(-3, 40), st.integers(lo, hi))
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if t == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(*hinted, st.sampled_from(FLOATS), st.floats(width=width))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(*hinted, st.sampled_from(STRINGS), st.text(max_size=40))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(*hinted, st.binary(max_size=64), st.just(b"\x00" * 4096))
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for {field.full_name} (type {t})")


def _value(field: FieldDescriptor, hints: Mapping[str, Sequence[Any]], depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, hints, depth + 1)
    return _scalar(field, hints.get(field.name, ()))


def _repeated(field: FieldDescriptor, hints: Mapping[str, Sequence[Any]], depth: int) -> st.SearchStrategy[list]:
    one = _value(field, hints, depth)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return st.lists(one, max_size=3)
    return st.one_of(st.lists(one, max_size=8), one.map(lambda v: [v] * _huge(v)))


def _huge(value: Any) -> int:
    """How many copies make a "huge" repeated field: ``HUGE``, fewer of long strings and bytes so that the
    message stays under ~2 MB (a bigger one the client refuses to send, and the server never sees it)."""
    if isinstance(value, str | bytes):
        return max(1, min(HUGE, 2_000_000 // max(1, len(value))))
    return HUGE


def messages(descriptor: Descriptor, hints: Mapping[str, Sequence[Any]] | None = None,
             depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of ``descriptor``'s type (the generated class's ``DESCRIPTOR``) with odd values."""
    hints = hints or {}
    fields = [f for f in descriptor.fields if f.containing_oneof is None or f.containing_oneof.name.startswith("_")]
    oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]  # "_x": a proto3 optional field
    if depth > 3:
        fields, oneofs = [], []
    per_field = {f.name: _repeated(f, hints, depth) if _is_repeated(f) else _value(f, hints, depth) for f in fields}
    chosen_oneofs = [st.sampled_from([None, *o.fields]) for o in oneofs]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        cls = _message_class(descriptor)
        values = {name: draw(st.one_of(st.none(), strategy)) for name, strategy in per_field.items()}
        for choice in chosen_oneofs:
            member = draw(choice)
            if member is not None:
                values[member.name] = draw(_value(member, hints, depth))
        return cls(**{k: v for k, v in values.items() if v is not None})

    return build()


def _is_repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 (``label`` is gone from upb's descriptors)
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)
