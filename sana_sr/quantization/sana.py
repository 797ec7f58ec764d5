"""The SANA-specific half of quantization; the model-agnostic half is `compress/`.

- Matmul sites: attention processors that route the attention matmuls through `compress.MatMul` modules installed
  on each attention module, so `compress` can quantize their inputs: the DiT's linear self-attention (V·Kᵀ and
  (V·Kᵀ)·Q), its softmax cross-attention (Q·Kᵀ and P·V), and the DC-AE's multi-scale linear attention.
  The linear attentions' normaliser row (Σ_n k_n, then its product with Q) stays full precision: it is one row of
  the product and an error in it rescales the whole output.
- The timestep MLP is folded into a constant: the one-step model only ever runs at t*, so AdaLN-single's output is
  the same two vectors for every image (448 numbers for `tiny` instead of 45k weights). It is exact, not quantized.
- `LatentRestorer`: what is compressed — the DiT's one step on z_L and the DC-AE decoder (the encoder stays full
  precision). Its selection rule keeps the first layer (the DiT's patch embedding, reading z_L) and the last (the
  decoder's conv_out, writing pixels) out of low-bit quantization, like the first/last convs of SwinIR in 2DQuant and
  CompSRT. The layers between the two parts (DiT proj_out, decoder conv_in) are body layers: the DiT's output is
  scaled by σ* = 0.25 before it reaches the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress import MatMul, SelectionRule
from sana_sr.model.pipeline import one_step_restore


def safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor, eps: float) -> torch.Tensor:
    """numerator / (denominator + eps) as diffusers' linear attentions compute it, but 0 where denominator == 0.

    There (a query whose every feature is 0 after ReLU and quantization) the full-precision numerator is exactly 0,
    while a quantized, rotated one is rounding noise: noise / eps (1e-15 in the DiT) reaches 1e15 and its gradient
    NaN. At full precision the two forms are equal (tested)."""
    attended = denominator > 0
    ratio = numerator / (torch.where(attended, denominator, torch.ones_like(denominator)) + eps)
    return torch.where(attended, ratio, torch.zeros_like(ratio))


# -- attention processors with matmul sites --------------------------------------------------------------------------
class QuantLinearAttnProcessor:
    """diffusers' SanaLinearAttnProcessor2_0 (ReLU linear attention) with `attn.kv_matmul` and `attn.out_matmul`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        original_dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()        # (B, h, d, N)
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()  # (B, h, N, d)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float()               # (B, h, d, N)
        scores = attn.kv_matmul(value, key)                                                 # (B, h, d, d)
        numerator = attn.out_matmul(scores, query)                                         # (B, h, d, N)
        denominator = torch.matmul(key.sum(dim=2, keepdim=True), query)                    # (B, h, 1, N)
        hidden_states = safe_ratio(numerator, denominator, 1e-15)
        hidden_states = hidden_states.flatten(1, 2).transpose(1, 2).to(original_dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


class QuantCrossAttnProcessor:
    """diffusers' SanaAttnProcessor2_0 (softmax attention) written out with `attn.qk_matmul` and `attn.pv_matmul`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        scores = attn.qk_matmul(query, key.transpose(-1, -2)) * head_dim**-0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        hidden_states = attn.pv_matmul(scores.softmax(dim=-1), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


class QuantMultiscaleAttnProcessor:
    """diffusers' SanaMultiscaleAttnProcessor2_0 (DC-AE) with matmul sites on its linear-attention path.

    The quadratic path (feature maps of at most `attention_head_dim` pixels, i.e. tiny inputs) stays full precision.
    """

    def __call__(self, attn, hidden_states):
        height, width = hidden_states.shape[-2:]
        use_linear = height * width > attn.attention_head_dim
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        original_dtype = hidden_states.dtype
        hidden_states = hidden_states.movedim(1, -1)
        qkv = torch.cat([attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)], dim=3)
        qkv = qkv.movedim(-1, 1)
        qkv = torch.cat([qkv] + [block(qkv) for block in attn.to_qkv_multiscale], dim=1)
        if use_linear:
            qkv = qkv.float()
        qkv = qkv.reshape(batch_size, -1, 3 * attn.attention_head_dim, height * width)
        query, key, value = qkv.chunk(3, dim=2)
        query, key = attn.nonlinearity(query), attn.nonlinearity(key)
        if use_linear:
            numerator = attn.out_matmul(attn.kv_matmul(value, key.transpose(-1, -2)), query)
            denominator = torch.matmul(key.sum(dim=-1, keepdim=True).transpose(-1, -2), query)
            hidden_states = safe_ratio(numerator.float(), denominator.float(), attn.eps).to(original_dtype)
        else:
            hidden_states = attn.apply_quadratic_attention(query, key, value)
        hidden_states = torch.reshape(hidden_states, (batch_size, -1, height, width))
        hidden_states = attn.to_out(hidden_states.movedim(1, -1)).movedim(-1, 1)
        if attn.norm_type == "rms_norm":
            hidden_states = attn.norm_out(hidden_states.movedim(1, -1)).movedim(-1, 1)
        else:
            hidden_states = attn.norm_out(hidden_states)
        return hidden_states + residual if attn.residual_connection else hidden_states


def install_matmul_sites(*modules: nn.Module) -> int:
    """Give every SANA attention in `modules` its matmul sites and the matching processor; returns how many."""
    count = 0
    for root in modules:
        for module in root.modules():
            name = type(module).__name__
            processor = type(getattr(module, "processor", None)).__name__
            if name == "SanaMultiscaleLinearAttention":
                module.kv_matmul, module.out_matmul = MatMul(), MatMul()
                module.processor = QuantMultiscaleAttnProcessor()
            elif processor in ("SanaLinearAttnProcessor2_0", "QuantLinearAttnProcessor"):
                module.kv_matmul, module.out_matmul = MatMul(), MatMul()
                module.set_processor(QuantLinearAttnProcessor())
            elif processor in ("SanaAttnProcessor2_0", "QuantCrossAttnProcessor"):
                module.qk_matmul, module.pv_matmul = MatMul(), MatMul()
                module.set_processor(QuantCrossAttnProcessor())
            else:
                continue
            count += 1
    return count


# -- the folded timestep embedding -----------------------------------------------------------------------------------
class FoldedTimestep(nn.Module):
    """AdaLayerNormSingle evaluated once at t*: returns the stored (modulation, embedding) for any batch."""

    def __init__(self, modulation: torch.Tensor, embedding: torch.Tensor, timestep: float):
        super().__init__()
        self.register_buffer("modulation", modulation.detach().reshape(-1).clone())
        self.register_buffer("embedding", embedding.detach().reshape(-1).clone())
        self.timestep = float(timestep)

    def forward(self, timestep, batch_size=None, hidden_dtype=None, **_):
        t = torch.as_tensor(timestep).float()
        if not torch.allclose(t, torch.full_like(t, self.timestep), rtol=0, atol=1e-3):
            raise ValueError(f"this compressed DiT has its timestep MLP folded at t*={self.timestep:g}; got "
                             f"t={t.flatten()[:1].tolist()}: run it at its own t*, or re-compress with --no-fold-timestep")
        batch = t.numel() if t.ndim else (batch_size or 1)
        dtype = hidden_dtype or self.modulation.dtype
        return (self.modulation.to(dtype).expand(batch, -1), self.embedding.to(dtype).expand(batch, -1))


@torch.no_grad()
def fold_timestep(transformer: nn.Module, timestep: float) -> None:
    """Replace `transformer.time_embed` by its constant output at `timestep` (exact)."""
    t = torch.tensor([timestep], dtype=torch.float32, device=transformer.device)
    modulation, embedding = transformer.time_embed(t, batch_size=1, hidden_dtype=torch.float32)
    transformer.time_embed = FoldedTimestep(modulation, embedding, timestep)


def folded_skeleton(transformer: nn.Module, timestep: float) -> None:
    """A FoldedTimestep of the right sizes with placeholder values (the loader fills them in)."""
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    transformer.time_embed = FoldedTimestep(torch.zeros(6 * width), torch.zeros(width), timestep)


# -- what is compressed ---------------------------------------------------------------------------------------------
class LatentRestorer(nn.Module):
    """z_L -> one DiT step -> z_H -> DC-AE decoder -> image in [-1, 1]: the part of SANA-SR that is quantized."""

    def __init__(self, transformer: nn.Module, decoder: nn.Module, timestep: float, sigma: float,
                 scaling_factor: float):
        super().__init__()
        self.transformer = transformer
        self.decoder = decoder
        self.timestep, self.sigma, self.scaling_factor = float(timestep), float(sigma), float(scaling_factor)

    @classmethod
    def from_pipeline(cls, pipe) -> "LatentRestorer":
        return cls(pipe.transformer, pipe.vae.decoder, pipe.timestep, pipe.sigma, pipe.vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        z = one_step_restore(self.transformer, latents, prompt_embeds, prompt_mask, self.timestep, self.sigma)
        return self.decoder(z / self.scaling_factor)

    def feature_modules(self) -> list[str]:
        """Block outputs matched by the block-wise feature loss: each DiT block and each decoder stage."""
        names = [f"transformer.transformer_blocks.{i}" for i in range(len(self.transformer.transformer_blocks))]
        return names + [f"decoder.up_blocks.{i}" for i in range(len(self.decoder.up_blocks))]


def sana_rule(boundary_wbits: int | None = 8, keep_caption: bool = False) -> SelectionRule:
    """The selection rule for a LatentRestorer: its first and last layer get `boundary_wbits`-bit weights (None:
    full precision) and full-precision inputs; the timestep MLP, if not folded, stays full precision."""
    keep = [("transformer.time_embed.*", "timestep MLP: runs once per image, and its error shifts the AdaLN "
                                         "modulation of every block (folded to a constant by default)")]
    if keep_caption:
        keep.append(("transformer.caption_projection.*", "caption projection kept full precision (--keep-caption)"))
    return SelectionRule(keep=tuple(keep), scopes=("",), boundary_wbits=boundary_wbits)
