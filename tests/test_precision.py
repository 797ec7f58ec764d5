"""Precision where training meets bf16: the DC-AE in its own dtype under autocast, an fp32 EMA over low-precision
weights, and gradient checkpointing that recomputes the frozen-prior pass as it ran."""

from __future__ import annotations

import pytest
import torch

from sana_sr import LoraSettings, build_pipeline
from sana_sr.model.lora import enable_adapter_aware_checkpointing
from sana_sr.train.config import LossConfig
from sana_sr.train.ema import MasterEMA
from sana_sr.train.objective import SRObjective

from .conftest import randomize_lora


def test_dc_ae_runs_in_its_own_dtype_under_the_losss_autocast(tiny_pipe):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen: list[torch.dtype] = []
    hook = tiny_pipe.vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        plain = tiny_pipe.encode(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents = tiny_pipe.encode(images)
            decoded = tiny_pipe.decode(latents)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.float32]  # the convolutions ran in fp32 inside the autocast block
    assert torch.equal(latents, plain) and decoded.dtype == torch.float32


def test_ema_shadows_stay_fp32_over_bf16_weights():
    """A bf16 module without DeepSpeed: at decay 0.999 a bf16 shadow would not move; the fp32 one follows the
    float64 EMA of the same (bf16) trajectory to fp32 rounding."""
    weight = torch.nn.Parameter(torch.full((64,), 0.25, dtype=torch.bfloat16))
    ema = MasterEMA([weight], decay=0.999, warmup=False)
    reference = None
    for step in range(200):
        with torch.no_grad():
            weight.add_(torch.full_like(weight, 2 ** -9))  # one bf16 ulp at 0.25..0.5 per step
        ema.update()
        w = weight.detach().double()
        reference = w.clone() if reference is None else reference - 0.001 * (reference - w)
    (full,) = ema.full()
    assert full.dtype == torch.float32
    assert (full.double() - reference).abs().max() < 1e-6
    assert (full.double() - 0.25).abs().min() > 0.005  # it moved: a bf16 shadow would still read 0.25 + 1 ulp


def test_ema_state_round_trips_and_refuses_another_layout():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    ema = MasterEMA(params, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            params[0].add_(1.0)
        ema.update()
    other = MasterEMA(params, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and all(torch.equal(a, b) for a, b in zip(ema.full(), other.full()))
    with pytest.raises(ValueError, match="do not match"):
        MasterEMA(params[:1], decay=0.9).load_state_dict(ema.state_dict())


def _lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    pipe = build_pipeline("tiny", lora=LoraSettings(rank=4), text_encoder=False)
    randomize_lora(pipe.transformer)
    transformer = pipe.transformer
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name)
    if checkpointing:
        enable_adapter_aware_checkpointing(transformer)
    transformer.train()
    objective = SRObjective(pipe, LossConfig(prior_alignment=1.0, adapter_consistency=1.0))
    generator = torch.Generator().manual_seed(0)
    lq = torch.rand(2, 3, 8, 8, generator=generator)
    gt = torch.rand(2, 3, 32, 32, generator=generator)
    embeds, mask = pipe.encode_prompt(None, 2)
    loss, terms, _ = objective(transformer, transformer, lq, gt, embeds, mask, torch.Generator().manual_seed(1))
    assert {"prior_alignment", "adapter_consistency"} <= terms.keys()
    loss.backward()
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_checkpointing_recomputes_the_frozen_prior_pass_with_the_adapter_off():
    """Plain checkpointing recomputes the adapter-disabled pass with the adapter on, and torch stops; this one
    gives the gradients of a run without checkpointing."""
    plain, checkpointed = _lora_grads(False), _lora_grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
