"""Which token positions the decoder computes: the real tokens of a padded batch (`Unpadded`) and,
in the last layer, only those whose outputs are read (`Selection`). Both are index bookkeeping that
`model.py` applies; neither holds weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Unpadded:
    """Where the real tokens of a padded (B, T) batch sit among its B * T positions.

    Everything but attention works token by token, so the model runs embeddings, projections, norms
    and the MLP on the N real tokens only (a padded batch of short rows is a quarter padding or
    more); attention scatters q / k / v back to (B, T) for one batched SDPA call. The same layout
    places a `Selection`'s queries on its (B, width) grid."""

    index: Tensor  # (N,) flat positions of the real tokens
    batch: int
    length: int

    @classmethod
    def of(cls, valid: Tensor) -> Unpadded:
        return cls(valid.reshape(-1).nonzero().squeeze(1), valid.shape[0], valid.shape[1])

    @property
    def layout(self) -> tuple[Tensor, int, int]:
        """(index, batch, length), as `heads_op.to_heads` takes them."""
        return self.index, self.batch, self.length

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def rows_of(self, flat: Tensor) -> Tensor:
        """Flat (B*T) positions of real tokens -> their rows among the N real tokens."""
        row_index = torch.full((self.batch * self.length,), -1, dtype=torch.long, device=flat.device)
        row_index[self.index] = torch.arange(len(self.index), device=flat.device)
        return row_index[flat]

    def scatter(self, x: Tensor) -> Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding (which every attention mask excludes)."""
        padded = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return padded.view(self.batch, self.length, *x.shape[1:])


@dataclass
class Selection:
    """The tokens whose outputs a forward needs (`outputs_at`), as the last layer uses them.

    Only keys and values of the last layer depend on every token; its queries, attention output,
    o_proj and MLP are needed only where hidden states or logits are read (a label's few positions
    in training, each row's last prompt token in scoring), so it runs those on the selected tokens:
    ~1/L of the decoder's work removed. The selected queries are laid out on a (B, width) grid,
    row by row, for one batched SDPA call (the model builds its mask from `query_positions`)."""

    rows: Tensor  # (M,) each selected token's row among the layer's tokens (flat B*T, or unpadded N)
    grid: Unpadded  # where the M queries sit on the (B, width) query grid (unused slots as padding)
    query_positions: Tensor  # (B, width) position id of each grid query (0 at unused slots)

    @classmethod
    def of(cls, outputs_at: Tensor, positions: Tensor, valid: Tensor, unpadded: Unpadded | None) -> Selection:
        batch, length = valid.shape
        if outputs_at.dtype == torch.bool:
            if outputs_at.shape != valid.shape:  # flattened, another shape would pick other rows' tokens
                raise ValueError(f"outputs_at: a bool mask must have the inputs' shape {tuple(valid.shape)}, "
                                 f"found {tuple(outputs_at.shape)}")
            flat = outputs_at.reshape(-1).nonzero().squeeze(1)
        else:
            flat = outputs_at.reshape(-1).long()
            if len(flat) and not (0 <= int(flat.min()) and int(flat.max()) < batch * length):
                raise ValueError(f"outputs_at: positions index the flat (B * T) = {batch * length} tokens, "
                                 f"found {int(flat.min())} .. {int(flat.max())}")
        if not bool(valid.reshape(-1)[flat].all()):
            raise ValueError("outputs_at selects a padding position; only real tokens have outputs")
        # slot = number of earlier selections in the same batch row (stable: keeps the caller's order)
        ordered, order = flat.sort(stable=True)
        counts = torch.bincount(ordered // length, minlength=batch)
        slot_sorted = torch.arange(len(flat), device=flat.device) - (counts.cumsum(0) - counts)[ordered // length]
        slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
        width = max(int(counts.max()), 1)
        grid = Unpadded((flat // length) * width + slot, batch, width)
        query_positions = torch.zeros(batch * width, dtype=positions.dtype, device=positions.device)
        query_positions[grid.index] = positions.reshape(-1)[flat]
        rows = unpadded.rows_of(flat) if unpadded is not None else flat
        return cls(rows, grid, query_positions.view(batch, width))
