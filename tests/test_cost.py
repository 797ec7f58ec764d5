"""`sana-sr cost`: MACs on the meta device (checked against an independent per-module count and the design's numbers),
linear scaling of SANA's DiT against a softmax-attention reference, the committed table, and a real CPU timing."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from sana_sr.model import cost

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cost.md"
SIZES = [(512, 512), (1024, 1024), (2048, 2048)]


@pytest.fixture(scope="module")
def sana06():
    return cost.meta_model("sana-0.6b")


@pytest.mark.slow
def test_sana_06b_reproduces_the_design_numbers(sana06):
    """DESIGN.md §3/§8: encoder ≈153M, DiT ≈592M, decoder ≈159M; ≈647 + 158 + 1046 GMACs at 512² output."""
    costs = {c.name: c for c in cost.component_costs(sana06, 512, 512)}
    gmacs = {name: c.macs / 1e9 for name, c in costs.items()}
    params = {name: c.params / 1e6 for name, c in costs.items()}
    assert gmacs["dc-ae encoder"] == pytest.approx(647.45, abs=0.01)
    assert gmacs["dit"] == pytest.approx(157.81, abs=0.01)
    assert gmacs["dc-ae decoder"] == pytest.approx(1046.08, abs=0.01)
    assert params["dc-ae encoder"] == pytest.approx(153.0, abs=0.1)
    assert params["dit"] == pytest.approx(591.7, abs=0.1)
    assert params["dc-ae decoder"] == pytest.approx(159.2, abs=0.1)
    assert params["text encoder"] == pytest.approx(2614.3, abs=0.1)  # Gemma-2-2B with its 256k vocabulary


def _independent_dit_count(transformer, latents, prompt_tokens: int) -> int:
    """MACs of every Linear and Conv2d from their hooked shapes, plus the attention products by formula."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features
        else:
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in transformer.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    cfg = transformer.config
    tokens = latents.shape[2] * latents.shape[3] // cfg.patch_size**2
    with torch.no_grad():
        transformer(latents, encoder_hidden_states=torch.empty(1, prompt_tokens, cfg.caption_channels, device="meta"),
                    encoder_attention_mask=torch.ones(1, prompt_tokens, device="meta"),
                    timestep=torch.ones(1, device="meta"), return_dict=False)
    for h in handles:
        h.remove()
    heads, d = cfg.num_attention_heads, cfg.attention_head_dim
    # Linear attention: (V padded with a row of ones) @ K, then @ Q: 2 * heads * (d + 1) * d * N.
    linear = 2 * heads * (d + 1) * d * tokens
    # Softmax cross-attention to the text: Q K^T and A V, each heads_c * d_c * N * L.
    cross = 2 * cfg.num_cross_attention_heads * cfg.cross_attention_head_dim * tokens * prompt_tokens
    return total + cfg.num_layers * (linear + cross)


@pytest.mark.slow
def test_flop_counter_counts_every_product_of_the_dit(sana06):
    """FlopCounterMode on the meta device sees the linear attention and the SDPA cross-attention (as bmm)."""
    latents = torch.empty(1, 32, 16, 12, device="meta")
    counted, ops = cost.count_macs(lambda: sana06.transformer(
        latents, encoder_hidden_states=torch.empty(1, 300, 2304, device="meta"),
        encoder_attention_mask=torch.ones(1, 300, device="meta"), timestep=torch.ones(1, device="meta"),
        return_dict=False))
    assert counted == _independent_dit_count(sana06.transformer, latents, 300)
    assert set(ops) <= {"aten.mm", "aten.addmm", "aten.bmm", "aten.convolution"}


class SoftmaxSelfAttention:
    """Reference: the same projections as SANA's attn1, but softmax attention (explicit matmuls, counted as bmm)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b, n, c = hidden_states.shape
        h = attn.heads
        q, k, v = (proj(hidden_states).view(b, n, h, c // h).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return attn.to_out[1](attn.to_out[0](out))


def _dit_macs(model, side: int) -> int:
    return cost.count_macs(lambda: model.transformer(
        torch.empty(1, 32, side, side, device="meta"), encoder_hidden_states=torch.empty(1, 300, 2304, device="meta"),
        encoder_attention_mask=torch.ones(1, 300, device="meta"), timestep=torch.ones(1, device="meta"),
        return_dict=False))[0]


@pytest.mark.slow
def test_dit_macs_are_linear_in_tokens_while_softmax_attention_is_quadratic():
    model = cost.meta_model("sana-0.6b")
    sides = (8, 16, 32, 64)  # latent sides: 64 .. 4096 tokens (256² .. 2048² output)
    tokens = [s * s for s in sides]
    linear = [_dit_macs(model, s) for s in sides]
    # Affine in N (a constant for the text/timestep paths + a slope): equal increments per added token.
    slopes = [(linear[i + 1] - linear[i]) / (tokens[i + 1] - tokens[i]) for i in range(3)]
    assert max(slopes) == min(slopes)

    for block in model.transformer.transformer_blocks:
        block.attn1.set_processor(SoftmaxSelfAttention())
    softmax = [_dit_macs(model, s) for s in sides]
    cfg = model.transformer.config
    width, heads, d = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads, cfg.attention_head_dim
    for n, lin, soft in zip(tokens, linear, softmax):
        # Exactly the quadratic attention products in place of the linear ones, in every layer.
        assert soft - lin == cfg.num_layers * (2 * width * n * n - 2 * heads * (d + 1) * d * n)
    soft_slopes = [(softmax[i + 1] - softmax[i]) / (tokens[i + 1] - tokens[i]) for i in range(3)]
    assert soft_slopes[0] < soft_slopes[1] < soft_slopes[2]
    # 1024 -> 4096 tokens: the linear DiT costs < 4x (affine), the softmax one > 5x (heading for 16x).
    assert linear[-1] / linear[-2] < 4 < 5 < softmax[-1] / softmax[-2]


@pytest.mark.slow
def test_committed_cost_table_is_current(sana06):
    """docs/cost.md is the command's output: its table rows are what the code computes now."""
    expected = cost.markdown_table("sana-0.6b", sana06, cost.cost_rows(sana06, SIZES))
    committed = DOCS.read_text()
    assert "sana-sr cost --model sana-0.6b --size 512 1024 2048" in committed
    for line in expected.splitlines():
        if line.startswith("| ") or line.startswith("Parameters"):
            assert line in committed, line


@pytest.mark.slow
def test_saved_model_costs_match_its_preset(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model")
    saved = cost.cost_rows(cost.meta_model(str(tmp_path / "model")), [(64, 96)])[0]
    preset = cost.cost_rows(cost.meta_model("tiny"), [(64, 96)])[0]
    for name in ("dc-ae encoder", "dit", "dc-ae decoder", "text encoder"):
        assert saved["components"][name]["macs"] == preset["components"][name]["macs"] > 0, name
        assert saved["components"][name]["params"] == preset["components"][name]["params"], name


@pytest.mark.slow
def test_cost_command_with_cpu_latency(tmp_path, capsys):
    code = cost.main(["--model", "tiny", "--size", "96x64", "--latency", "--device", "cpu", "--warmup", "1",
                      "--repeats", "2", "--json", str(tmp_path / "cost.json"), "--output", str(tmp_path / "cost.md")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| 96x64 | 24x16 |" in out and "end to end" in out
    result = json.loads((tmp_path / "cost.json").read_text())["latency"]
    assert result["output"] == "96x64" and result["output_finite"]
    assert all(s > 0 for s in result["seconds"].values()) and result["peak_process_rss_mib"] > 0
    assert (tmp_path / "cost.md").read_text().strip() == out.strip()
    assert cost.main(["--size", "12y"]) == 2
    assert re.search(r"size must be N or WxH", capsys.readouterr().err)
