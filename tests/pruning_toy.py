"""A small non-SANA network and its `PrunableStructure`: what `compress.pruning` is tested on, to show that the
package prunes a model it was not written for. Imports nothing from `sana_sr`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.pruning import GroupSpec, PrunableStructure, Widths


class ToyBlock(nn.Module):
    """Pre-norm residual block on tokens: multi-head softmax attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, channels: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.out = nn.Linear(heads * head_dim, dim)
        self.up = nn.Linear(dim, channels)
        self.down = nn.Linear(channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1) @ v
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return x + self.down(F.gelu(self.up(x)))


class ToyNet(nn.Module):
    """Linear stem + a bare positional table (on the residual width) -> blocks -> linear head.

    `widths` gives each block's heads and channels; `kept_blocks` records which block of the unpruned net each
    block was (the "config" the pruned weights are re-homed by)."""

    def __init__(self, widths: Sequence[Widths] = (Widths(heads=4, channels=24),) * 3, in_dim: int = 6,
                 dim: int = 16, head_dim: int = 4, tokens: int = 5, kept_blocks: Sequence[int] | None = None):
        super().__init__()
        self.in_dim, self.head_dim, self.tokens = in_dim, head_dim, tokens
        self.kept_blocks = list(kept_blocks) if kept_blocks is not None else list(range(len(widths)))
        self.stem = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.1)
        self.blocks = nn.ModuleList([ToyBlock(dim, w["heads"], head_dim, w["channels"]) for w in widths])
        self.head = nn.Linear(dim, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class ToyStructure(PrunableStructure):
    """Heads (q, k, v rows + `out` columns) and MLP channels (`up` rows + `down` columns) of every `ToyBlock`."""

    kinds = ("heads", "channels")

    def blocks(self, model: ToyNet) -> nn.ModuleList:
        return model.blocks

    def layers(self, model: ToyNet, block: ToyBlock) -> list[GroupSpec]:
        heads = GroupSpec("heads", model.head_dim, block.q,
                          ((block.q, True), (block.k, True), (block.v, True), (block.out, False)))
        return [heads, GroupSpec("channels", 1, block.up, ((block.up, True), (block.down, False)))]

    def widths(self, model: ToyNet) -> list[Widths]:
        return [Widths(heads=b.q.out_features // model.head_dim, channels=b.up.out_features) for b in model.blocks]

    def example_inputs(self, model: ToyNet) -> torch.Tensor:
        return torch.randn(2, model.tokens, model.in_dim)

    def unwrapped_parameters(self, model: ToyNet) -> list[tuple[nn.Parameter, int]]:
        return [(model.pos, 1)]

    def after_cut(self, model: ToyNet) -> None:
        for block in model.blocks:
            block.heads = block.q.out_features // model.head_dim

    def select_blocks(self, model: ToyNet, kept: list[int]) -> None:
        model.blocks = nn.ModuleList([model.blocks[b] for b in kept])

    def rebuild(self, model: ToyNet, kept_blocks: list[int]) -> ToyNet:
        with torch.device("meta"):
            pruned = ToyNet(self.widths(model), model.in_dim, model.stem.out_features, model.head_dim, model.tokens,
                            [model.kept_blocks[b] for b in kept_blocks])
        pruned.load_state_dict(model.state_dict(), strict=True, assign=True)
        return pruned.train(model.training)


def toy_net(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet().eval()


def toy_inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(seed))
