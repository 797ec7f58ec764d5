"""Model presets: the configs of the real SANA stacks, and a tiny one that runs every code path on a CPU.

The real configs are those of the published checkpoints, so a preset can be built on the meta device
(no weights, no memory) for cost accounting, or loaded from its hub id for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The tiny preset's pretrained weights ship with the package (`sana-sr pretrain-tiny` made them).
from sana_sr.bundled import TINY_BASE

# DC-AE f32c32 of SANA (diffusers' conversion of dc-ae-f32c32-sana-1.x).
_DC_AE_F32C32 = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)

# Gemma-2-2B, the text encoder of SANA (its hidden size is the DiT's caption_channels).
_GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
)


def _sana_dit(heads: int, layers: int, cross_heads: int, cross_head_dim: int) -> dict[str, Any]:
    width = heads * 32
    return dict(
        in_channels=32,
        out_channels=32,
        num_attention_heads=heads,
        attention_head_dim=32,
        num_layers=layers,
        num_cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_head_dim,
        cross_attention_dim=width,
        caption_channels=2304,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=32,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


@dataclass(frozen=True)
class Preset:
    """Everything needed to build (or download) one model size."""

    name: str
    vae: dict[str, Any]
    """`AutoencoderDC` config."""
    transformer: dict[str, Any]
    """`SanaTransformer2DModel` config."""
    text_encoder: dict[str, Any]
    """`Gemma2Config` kwargs: used to build the encoder on the meta device, or at random for `tiny`."""
    vae_id: str | None = None
    """Hub id (or local folder) of the pretrained DC-AE; None: random init only."""
    base_id: str | None = None
    """Hub id of the SANA text-to-image pipeline whose `transformer/`, `text_encoder/` and `tokenizer/` we start from."""
    max_sequence_length: int = 300
    """Prompt tokens fed to the cross-attention (SANA uses 300)."""
    lora_rank: int = 64
    """Default LoRA rank for this size (the authors' release: 64)."""


PRESETS: dict[str, Preset] = {
    # Same classes and code paths as the real sizes, seconds on a CPU. Its DC-AE compresses 4x, not 32x, so that
    # minutes of CPU training on a handful of photos reach a useful reconstruction quality; every code path reads
    # the ratio from the AE config, never assumes 32. Random init, or the bundled pretrained base.
    "tiny": Preset(
        name="tiny",
        vae=dict(
            _DC_AE_F32C32,
            attention_head_dim=8,
            encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(16, 32, 64),
            decoder_block_out_channels=(16, 32, 64),
            encoder_layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (5,), (5,)),
            decoder_qkv_multiscales=((), (5,), (5,)),
            scaling_factor=1.0,
        ),
        transformer=dict(
            _sana_dit(heads=4, layers=4, cross_heads=2, cross_head_dim=32),
            attention_head_dim=16,
            cross_attention_dim=64,
            caption_channels=64,
            sample_size=8,
        ),
        text_encoder=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=512,
        ),
        vae_id=str(TINY_BASE / "dc-ae"),
        base_id=str(TINY_BASE / "sana"),
        max_sequence_length=32,
        lora_rank=8,
    ),
    "sana-0.6b": Preset(
        name="sana-0.6b",
        vae=_DC_AE_F32C32,
        transformer=_sana_dit(heads=36, layers=28, cross_heads=16, cross_head_dim=72),
        text_encoder=_GEMMA2_2B,
        vae_id="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
        base_id="Efficient-Large-Model/Sana_600M_1024px_diffusers",
    ),
    "sana-1.6b": Preset(
        name="sana-1.6b",
        vae=_DC_AE_F32C32,
        transformer=_sana_dit(heads=70, layers=20, cross_heads=20, cross_head_dim=112),
        text_encoder=_GEMMA2_2B,
        vae_id="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
        base_id="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    ),
}


# The architecture of the shipped `tiny-sr` model (not a preset: `tiny-sr` names the trained model). Against the
# `tiny` preset, its DC-AE has no full-resolution stage and no attention (pixel-unshuffle in, pixel-shuffle out,
# ResBlocks of 32, 32, 64 channels: 41.5 dB reconstruction PSNR-Y, where tiny's 16/32/64 EfficientViT AE reached
# ~31), and its DiT has 6 layers instead of 4. `sana-sr pretrain-tiny --recipe sr` trains it from random weights.
TINY_SR_VAE: dict[str, Any] = dict(
    PRESETS["tiny"].vae,
    encoder_block_types=("ResBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3,
    encoder_block_out_channels=(32, 32, 64),
    decoder_block_out_channels=(32, 32, 64),
    encoder_layers_per_block=(0, 1, 1),
    decoder_layers_per_block=(0, 1, 1),
    encoder_qkv_multiscales=((), (), ()),
    decoder_qkv_multiscales=((), (), ()),
    downsample_block_type="pixel_unshuffle",
    upsample_block_type="pixel_shuffle",
)
TINY_SR_TRANSFORMER: dict[str, Any] = dict(PRESETS["tiny"].transformer, num_layers=6)

def get_preset(name: str) -> Preset:
    """The preset called `name`, or a ValueError that lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
