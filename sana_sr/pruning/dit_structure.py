"""The SANA DiT's structure as torch-pruning needs to see it (the rules that use it: `structure.SanaDiTStructure`).

`GLUMBConv` computes its value and gate with ONE 1x1 conv and ONE depthwise conv of 2c channels and then
`torch.chunk`s them: hidden channel i lives at index i (value) and i + c (gate). torch-pruning's dependency graph
follows that chunk, but a group rooted at the 2c-channel convs ranks 2c channels independently, so MetaPruner
either indexes past the c-channel `conv_point` (the IndexError) or keeps the value of a channel whose gate it
removed. `SplitGLUMBConv` is the same function with value and gate in separate convs: every edge of the graph is
then one-to-one, hidden channel i is one prunable unit, and `merge_glu` folds the result back into diffusers'
`GLUMBConv` layout for saving.

Attention heads: both processors derive the head size from the projection width and `attn.heads`
(`unflatten(1, (heads, -1))` in the linear one, `inner_dim // heads` in the SDPA one), so after pruning whole
heads only `heads` must be set again: `sync_heads` does it from the projection width and the fixed head size.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.sana_transformer import GLUMBConv, SanaTransformerBlock
from torch import nn

from compress.pruning import DEPTH, Widths

# The prunable units of a block: heads of the linear self-attention, heads of the cross-attention, GLU channels.
KINDS = ("heads", "cross_heads", "channels")
# What `sana-sr prune --structures` may name: the kinds, and whole blocks.
STRUCTURES = (*KINDS, DEPTH)


class BlockWidths(Widths):
    """The prunable widths of one `SanaTransformerBlock`, as `Widths` with SANA's three kinds, in this order.

    heads: heads of the linear self-attention `attn1`; cross_heads: heads of the cross-attention `attn2` (0 when
    the block has none); channels: hidden channels of the GLUMBConv feed-forward (value and gate each have this many).
    """

    def __init__(self, heads: int, cross_heads: int, channels: int):
        super().__init__(heads=heads, cross_heads=cross_heads, channels=channels)


class SplitGLUMBConv(nn.Module):
    """`GLUMBConv` (no norm, no residual, as in SANA's blocks) with value and gate in separate convolutions."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.nonlinearity = nn.SiLU()
        self.value_inverted = nn.Conv2d(in_channels, hidden, 1)
        self.gate_inverted = nn.Conv2d(in_channels, hidden, 1)
        self.value_depth = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.gate_depth = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv_point = nn.Conv2d(hidden, out_channels, 1, bias=False)

    @classmethod
    def from_glumbconv(cls, ff: GLUMBConv) -> SplitGLUMBConv:
        if ff.norm_type is not None or ff.residual_connection:
            raise ValueError("only SANA's block feed-forward (no norm, no residual) can be split; got "
                             f"norm_type={ff.norm_type!r}, residual_connection={ff.residual_connection}")
        hidden = ff.conv_point.in_channels
        with torch.device("meta"):  # every parameter is replaced below
            split = cls(ff.conv_inverted.in_channels, hidden, ff.conv_point.out_channels)
        # The halves are copied, not approximated: the split model computes exactly what the original does.
        for conv, prefix in ((ff.conv_inverted, "inverted"), (ff.conv_depth, "depth")):
            for half, part in ((slice(0, hidden), "value"), (slice(hidden, 2 * hidden), "gate")):
                target = getattr(split, f"{part}_{prefix}")
                target.weight = nn.Parameter(conv.weight.detach()[half].clone(), conv.weight.requires_grad)
                target.bias = nn.Parameter(conv.bias.detach()[half].clone(), conv.bias.requires_grad)
        split.conv_point = ff.conv_point
        return split

    def to_glumbconv(self) -> GLUMBConv:
        """The same function in diffusers' layout: value channels first, then gate channels."""
        hidden = self.conv_point.in_channels
        return glumbconv_of(_merged_conv(self.value_inverted, self.gate_inverted, groups=1),
                            _merged_conv(self.value_depth, self.gate_depth, groups=2 * hidden), self.conv_point)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value = self.value_depth(self.nonlinearity(self.value_inverted(hidden_states)))
        gate = self.gate_depth(self.nonlinearity(self.gate_inverted(hidden_states)))
        return self.conv_point(value * self.nonlinearity(gate))


def _merged_conv(value: nn.Conv2d, gate: nn.Conv2d, groups: int) -> nn.Conv2d:
    k = value.kernel_size[0]
    with torch.device("meta"):  # both parameters are replaced below
        conv = nn.Conv2d(value.in_channels if groups == 1 else 2 * value.in_channels, 2 * value.out_channels, k, 1,
                         k // 2, groups=groups)
    conv.weight = nn.Parameter(torch.cat([value.weight.detach(), gate.weight.detach()]), value.weight.requires_grad)
    conv.bias = nn.Parameter(torch.cat([value.bias.detach(), gate.bias.detach()]), value.bias.requires_grad)
    return conv


def glumbconv_of(conv_inverted: nn.Conv2d, conv_depth: nn.Conv2d, conv_point: nn.Conv2d) -> GLUMBConv:
    """A diffusers `GLUMBConv` (SANA's block variant) holding exactly these three layers."""
    with torch.device("meta"):  # its own layers are replaced at once: never allocate them
        ff = GLUMBConv(conv_inverted.in_channels, conv_point.out_channels, expand_ratio=1.0, norm_type=None,
                       residual_connection=False)
    ff.conv_inverted, ff.conv_depth, ff.conv_point = conv_inverted, conv_depth, conv_point
    return ff


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return model.transformer_blocks


def block_names(model: nn.Module) -> list[str]:
    """Module names of the DiT's blocks, in order (for feature taps)."""
    return [f"transformer_blocks.{i}" for i in range(len(blocks_of(model)))]


def split_glu(model: nn.Module) -> None:
    """Replace every block's `GLUMBConv` by its `SplitGLUMBConv` (in place; exact)."""
    for block in blocks_of(model):
        if isinstance(block.ff, GLUMBConv):
            block.ff = SplitGLUMBConv.from_glumbconv(block.ff)


def merge_glu(model: nn.Module) -> None:
    """Undo `split_glu` (in place; exact)."""
    for block in blocks_of(model):
        if isinstance(block.ff, SplitGLUMBConv):
            block.ff = block.ff.to_glumbconv()


def head_dims(config) -> tuple[int, int]:
    """(self-attention, cross-attention) head sizes of a SanaTransformer2DModel config: fixed by pruning."""
    return int(config.attention_head_dim), int(config.cross_attention_head_dim or 0)


def block_widths(block: SanaTransformerBlock, head_dim: int, cross_head_dim: int) -> BlockWidths:
    attn2 = getattr(block, "attn2", None)
    ff = block.ff
    return BlockWidths(
        heads=block.attn1.to_q.out_features // head_dim,
        cross_heads=attn2.to_q.out_features // cross_head_dim if attn2 is not None else 0,
        channels=ff.conv_point.in_channels,
    )


def model_widths(model: nn.Module) -> list[BlockWidths]:
    """The widths of every block of a (pruned or not) SanaTransformer2DModel."""
    head_dim, cross_head_dim = head_dims(model.config)
    return [block_widths(b, head_dim, cross_head_dim) for b in blocks_of(model)]


def check_supported(model: nn.Module) -> None:
    """Fail early, with the reason, on configurations the pruning does not cover."""
    if getattr(model, "peft_config", None) or any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError("the DiT carries a PEFT LoRA adapter: merge it first (SanaSRPipeline.merge_lora())")
    if model.config.qk_norm is not None:
        raise ValueError(f"qk_norm={model.config.qk_norm!r} is not supported (its norm spans the heads); "
                         "prune a model with qk_norm=None")
    for i, block in enumerate(blocks_of(model)):
        ff = block.ff
        if isinstance(ff, GLUMBConv) and (ff.norm_type is not None or ff.residual_connection):
            raise ValueError(f"block {i}: GLUMBConv with a norm or residual is not SANA's block layout")


def _set_heads(attn: nn.Module, heads: int, head_dim: int) -> None:
    attn.heads = heads
    attn.sliceable_head_dim = heads
    attn.inner_dim = heads * head_dim
    attn.inner_kv_dim = heads * head_dim


def sync_heads(model: nn.Module) -> None:
    """Set each attention's `heads` from its (pruned) projection width: the processors reshape with it."""
    head_dim, cross_head_dim = head_dims(model.config)
    for i, block in enumerate(blocks_of(model)):
        for attn, d in ((block.attn1, head_dim), (getattr(block, "attn2", None), cross_head_dim)):
            if attn is None:
                continue
            widths = {attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features, attn.to_out[0].in_features}
            if len(widths) != 1 or next(iter(widths)) % d:
                raise RuntimeError(f"block {i}: projection widths {sorted(widths)} are not one whole number of "
                                   f"{d}-wide heads; the pruning went wrong")
            _set_heads(attn, next(iter(widths)) // d, d)


def resize_block(block: SanaTransformerBlock, widths: BlockWidths, head_dim: int, cross_head_dim: int) -> None:
    """Give a block fresh (uninitialised) layers of the given widths, on the device and dtype of its own.

    Used to build the skeleton a saved pruned model loads into; the values come from the checkpoint.
    """
    device, dtype = block.scale_shift_table.device, block.scale_shift_table.dtype

    def linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
        return nn.Linear(in_features, out_features, bias=old.bias is not None, device=device, dtype=dtype)

    for attn, heads, d in ((block.attn1, widths.heads, head_dim),
                           (getattr(block, "attn2", None), widths.cross_heads, cross_head_dim)):
        if attn is None:
            continue
        if heads < 1:
            raise ValueError(f"an attention needs at least one head, got {heads}")
        inner = heads * d
        attn.to_q = linear(attn.to_q, attn.to_q.in_features, inner)
        attn.to_k = linear(attn.to_k, attn.to_k.in_features, inner)
        attn.to_v = linear(attn.to_v, attn.to_v.in_features, inner)
        attn.to_out[0] = linear(attn.to_out[0], inner, attn.to_out[0].out_features)
        _set_heads(attn, heads, d)
    # Not GLUMBConv(expand_ratio=c / dim): int(ratio * dim) can round c down by one.
    dim, out, c = block.ff.conv_inverted.in_channels, block.ff.conv_point.out_channels, widths.channels
    if c < 1:
        raise ValueError(f"a GLUMBConv needs at least one hidden channel, got {c}")
    kw = dict(device=device, dtype=dtype)
    block.ff = glumbconv_of(nn.Conv2d(dim, 2 * c, 1, **kw), nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c, **kw),
                            nn.Conv2d(c, out, 1, bias=False, **kw))


def example_inputs(model: nn.Module, batch: int = 1, side: int = 4, text_tokens: int = 8) -> dict[str, torch.Tensor]:
    """Small inputs of the right shapes (on the model's device) for tracing the graph."""
    cfg = model.config
    p = next(model.parameters())
    side = side * cfg.patch_size
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, side, side, device=p.device, dtype=p.dtype),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.caption_channels, device=p.device, dtype=p.dtype),
        "encoder_attention_mask": torch.ones(batch, text_tokens, device=p.device),
        "timestep": torch.full((batch,), 500.0, device=p.device, dtype=p.dtype),
    }


def forward_fn(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """How torch-pruning calls the DiT: the sample tensor, not diffusers' output object."""
    return model(**inputs, return_dict=False)[0]
