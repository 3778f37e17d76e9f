"""What one forward pass of a stage computes: which sequences, how many new tokens each,
where their KV lives. Passed explicitly to every layer that needs it (no hidden global).

Built once per step and shared by every layer: the KV block and row each new token is
written to, and for attention the decode sequences' block tables and lengths (one native
call per layer for all of them) and, per prefill chunk, the blocks of its context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from stagekit.types.step import SeqSlice

if TYPE_CHECKING:
    from stagekit.kv.kv_cache import PagedKVCache


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """A slice with several new tokens: rows ``[offset, offset + n)`` of the batch attend to
    the sequence's first ``num_computed + n`` tokens, held in ``context_blocks``."""

    offset: int
    n: int
    num_computed: int
    context_blocks: torch.Tensor  # [ceil((num_computed + n) / block_size)] int64


@dataclass(slots=True)
class ForwardBatch:
    """A flattened batch: the tokens of ``seqs`` are concatenated in order
    (hidden states are [num_tokens, hidden])."""

    seqs: list[SeqSlice]
    positions: torch.Tensor  # [num_tokens] int64
    kv_cache: PagedKVCache
    write_blocks: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # [T]
    write_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))    # [T]
    decode_rows: torch.Tensor | None = None  # [Bd] batch rows of one-token slices; None: every row is one
    decode_tables: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.int32))  # [Bd, M]
    decode_lens: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))  # [Bd]
    prefills: list[PrefillChunk] = field(default_factory=list)

    @classmethod
    def build(cls, seqs: list[SeqSlice], kv_cache: PagedKVCache, device: torch.device) -> ForwardBatch:
        positions, w_blocks, w_rows, prefills = [], [], [], []
        dec_rows, dec_tables, dec_lens = [], [], []
        bs = kv_cache.block_size
        offset = 0
        for s in seqs:
            end = s.num_computed + s.num_new
            table = kv_cache.tables[s.seq_id]
            for pos in range(s.num_computed, end):
                w_blocks.append(table[pos // bs])
                w_rows.append(pos % bs)
            positions.extend(range(s.num_computed, end))
            if s.num_new == 1:
                dec_rows.append(offset)
                dec_tables.append(table)
                dec_lens.append(end)
            else:
                ctx = torch.tensor(table[: -(-end // bs)], dtype=torch.int64, device=device)
                prefills.append(PrefillChunk(offset, s.num_new, s.num_computed, ctx))
            offset += s.num_new
        width = max((len(t) for t in dec_tables), default=0)
        batch = cls(
            seqs=seqs,
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            kv_cache=kv_cache,
            write_blocks=torch.tensor(w_blocks, dtype=torch.int64, device=device),
            write_rows=torch.tensor(w_rows, dtype=torch.int64, device=device),
            decode_rows=None if len(dec_rows) == offset else torch.tensor(dec_rows, dtype=torch.int64, device=device),
            decode_tables=torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.int32,
                                       device=device).view(len(dec_tables), width),
            decode_lens=torch.tensor(dec_lens, dtype=torch.int32, device=device),
            prefills=prefills,
        )
        return batch

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def num_decodes(self) -> int:
        return int(self.decode_lens.numel())

    def sample_indices(self) -> torch.Tensor:
        """Index of the last token of every sequence that is sampled after this step."""
        idx, end = [], 0
        for s in self.seqs:
            end += s.num_new
            if s.sample:
                idx.append(end - 1)
        return torch.tensor(idx, dtype=torch.int64, device=self.positions.device)
