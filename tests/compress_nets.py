"""Small models for the compress tests: every layer kind the package handles, in a few thousand parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import MatMul


class ToyRestorer(nn.Module):
    """Conv stem -> 1x1 conv -> depthwise conv -> LayerNorm -> Linear -> self-attention (MatMul sites) -> conv out."""

    def __init__(self, width: int = 24, tokens_dim: int = 20):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, width, 1)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, tokens_dim)
        self.scores = MatMul()
        self.mix = MatMul()
        self.head = nn.Conv2d(tokens_dim, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(torch.relu(self.stem(x))))
        t = self.proj(self.norm(h.permute(0, 2, 3, 1)))
        b, height, width, c = t.shape
        tokens = t.reshape(b, height * width, c)
        attn = torch.softmax(self.scores(tokens, tokens.transpose(1, 2)) / c**0.5, dim=-1)
        tokens = self.mix(attn, tokens)
        return self.head(tokens.reshape(b, height, width, c).permute(0, 3, 1, 2)) + x


def toy_batches(n: int = 3, seed: int = 0, size: int = 10) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, size, size, generator=g) for _ in range(n)]


def toy_model(seed: int = 0) -> ToyRestorer:
    torch.manual_seed(seed)
    return ToyRestorer()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: thread-pool hand-offs cost more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
