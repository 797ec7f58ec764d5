"""The model: real diffusers/PEFT classes, real configs, diffusers folder layout, the one-step formula."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel

from sana_sr import LoraSettings, SanaSRPipeline, build_pipeline, get_preset
from sana_sr.model.lora import LORA_WEIGHT_NAME, load_lora


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_presets_have_the_published_sizes_on_meta():
    pipe = build_pipeline("sana-0.6b", weights="meta", text_encoder=False)
    assert pipe.transformer.device.type == "meta"
    assert _params(pipe.transformer) == pytest.approx(592e6, rel=0.01)
    assert _params(pipe.vae.encoder) == pytest.approx(153e6, rel=0.01)
    assert _params(pipe.vae.decoder) == pytest.approx(159e6, rel=0.01)
    assert pipe.vae.spatial_compression_ratio == 32
    assert pipe.vae.config.scaling_factor == pytest.approx(0.41407)
    big = build_pipeline("sana-1.6b", weights="meta", text_encoder=True)
    assert _params(big.transformer) == pytest.approx(1.6e9, rel=0.01)
    assert _params(big.text_encoder) == pytest.approx(2.6e9, rel=0.01)  # Gemma-2-2B with its 256k vocabulary


def test_operating_point_is_the_release_one(tiny_pipe):
    assert tiny_pipe.sigma == pytest.approx(0.25)
    assert tiny_pipe.timestep == pytest.approx(250.0)


@pytest.mark.slow
def test_save_load_is_bit_identical(tiny_pipe, lq_photo, tmp_path):
    expected = tiny_pipe(lq_photo, prompt="a photo of a cat")
    tiny_pipe.save_pretrained(tmp_path / "pipe")

    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "SanaSRPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderDC"]
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    # The base weights are saved clean; the adapter lives in its own file.
    with safetensors.safe_open(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    assert (tmp_path / "pipe" / "lora" / LORA_WEIGHT_NAME).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    loaded = SanaSRPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(lq_photo, prompt="a photo of a cat"), expected)


@pytest.mark.slow
def test_lora_changes_output_and_merges_to_float_tolerance(tiny_pipe, lq_photo, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    with_lora = SanaSRPipeline.from_pretrained(tmp_path / "pipe")
    without = SanaSRPipeline.from_pretrained(tmp_path / "pipe", load_lora_adapter=False)
    unmerged = with_lora(lq_photo)
    assert (unmerged - without(lq_photo)).abs().max() > 1e-3, "the adapter should change the output"
    with_lora.merge_lora()
    assert not [n for n, _ in with_lora.transformer.named_modules() if "lora" in n]
    torch.testing.assert_close(with_lora(lq_photo), unmerged, atol=1e-5, rtol=0)


def test_lora_file_is_a_standard_peft_adapter(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    path = tmp_path / "pipe" / "lora" / LORA_WEIGHT_NAME
    with safetensors.safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert any(k.startswith("transformer_blocks.0.attn1.to_q.lora_A") for k in keys)
    assert any(k.startswith("transformer_blocks.0.attn2.to_v.lora_B") for k in keys)
    # A bare diffusers model takes the adapter through diffusers' own API.
    fresh = SanaTransformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer")
    load_lora(fresh, path)
    for name, param in tiny_pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.testing.assert_close(dict(fresh.named_parameters())[name], param)


@pytest.mark.slow
def test_pretrained_path_loads_hub_layout_through_from_pretrained(tiny_pipe, lq_photo, tmp_path):
    """The real presets load `vae_id` and `base_id/{transformer,text_encoder,tokenizer}`; run that path on tiny."""
    tiny_pipe.vae.save_pretrained(tmp_path / "dc-ae")
    fresh = build_pipeline("tiny")  # same seed -> same base weights as tiny_pipe, without the adapter
    fresh.transformer.save_pretrained(tmp_path / "sana" / "transformer")
    fresh.text_encoder.save_pretrained(tmp_path / "sana" / "text_encoder")
    fresh.tokenizer.save_pretrained(tmp_path / "sana" / "tokenizer")
    loaded = build_pipeline("tiny", weights="pretrained", vae_id=str(tmp_path / "dc-ae"), base_id=str(tmp_path / "sana"))
    assert torch.equal(loaded(lq_photo), fresh(lq_photo))


def test_preset_without_weights_says_so():
    unpublished = dataclasses.replace(get_preset("tiny"), vae_id=None, base_id=None)
    with pytest.raises(ValueError, match="no published weights"):
        build_pipeline(unpublished, weights="pretrained")


@pytest.mark.slow
def test_stored_default_prompt_equals_encoding_the_null_prompt(lq_photo):
    pipe = build_pipeline("tiny")
    with_encoder = pipe(lq_photo, prompt="")
    pipe.drop_text_encoder()
    assert pipe.text_encoder is None
    torch.testing.assert_close(pipe(lq_photo), with_encoder, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no text encoder"):
        pipe(lq_photo, prompt="a dog")
    embeds, mask = build_pipeline("tiny").encode_prompt("a dog", 1)
    torch.testing.assert_close(pipe(lq_photo, prompt_embeds=embeds, prompt_attention_mask=mask),
                               build_pipeline("tiny")(lq_photo, prompt="a dog"), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_one_step_formula_against_hand_computation(lq_photo):
    """A DiT whose velocity is a known constant c: the output must be decode(encode(bicubic(x)) - sigma* c)."""
    pipe = build_pipeline("tiny")
    proj = pipe.transformer.proj_out
    proj.weight.data.zero_()
    velocity = torch.linspace(-1, 1, proj.bias.numel())
    proj.bias.data.copy_(velocity)
    seen = {}
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(timestep=kwargs["timestep"]), with_kwargs=True
    )
    out = pipe(lq_photo)

    with torch.no_grad():
        up = torch.nn.functional.interpolate(lq_photo, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        vae: AutoencoderDC = pipe.vae
        z = vae.encode(up * 2 - 1).latent * vae.config.scaling_factor
        z_hat = z - 0.25 * velocity.view(1, -1, 1, 1)
        expected = ((vae.decode(z_hat / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert seen["timestep"].tolist() == [250.0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_batched_equals_one_by_one(tiny_pipe):
    from .conftest import load_photo

    a, b = load_photo("coffee.png", (48, 32)), load_photo("rocket.jpg", (48, 32))
    batched = tiny_pipe(torch.cat([a, b]), prompt=["a cup", "a rocket"])
    torch.testing.assert_close(batched[1:], tiny_pipe(b, prompt="a rocket"), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[:1], tiny_pipe(a, prompt="a cup"), atol=1e-5, rtol=0)


def test_odd_sizes_are_padded_and_cropped(tiny_pipe):
    from .conftest import load_photo

    out = tiny_pipe(load_photo("astronaut.png", (37, 23)))
    assert out.shape == (1, 3, 92, 148)
    assert 0 <= out.min() and out.max() <= 1


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSettings(rank=0)
    pipe = build_pipeline("tiny", lora=LoraSettings(rank=2, target_modules=("to_q", "conv_inverted")))
    names = [n for n, _ in pipe.transformer.named_modules()]
    assert any(n.endswith("ff.conv_inverted.lora_A") for n in names)
