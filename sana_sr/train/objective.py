"""The SANA-SR training objective: one LoRA DiT step over the frozen DC-AE, and its loss terms.

    lq --bicubic--> encode --> z_L --LoRA DiT at t*--> z_hat = z_L - sigma* v --decode--> sr   (grads: LoRA only)

- pixel L2 between sr and the (possibly USM-sharpened) HQ image, in [-1, 1];
- LPIPS-VGG on the same pair, when its weights are present (a missing network stops the run at start);
- frozen-prior alignment: the DiT with its adapter disabled predicts velocities on noised z_hat and on noised z_H
  (same noise, sigma = t / 1000 with t uniform in `prior_timesteps`); per-channel Gaussians are fitted to both and
  KL(z_hat's || z_H's) is minimised, so the restored latent looks like a clean image to the frozen prior;
- adapter consistency: MSE between the LoRA DiT and the frozen DiT (detached) on noised z_hat;
- distillation (with a teacher: the unpruned DiT when fine-tuning a pruned one): MSE of the velocity at t* and of
  the block features, student block i against the teacher block it was cut from (compress.pruning.distill).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from sana_sr.model.pipeline import SanaSRPipeline, bicubic_upsample, one_step_restore, predict_velocity
from sana_sr.train.config import LossConfig


@contextmanager
def adapter_disabled(transformer: torch.nn.Module):
    """Run the frozen base DiT: PEFT's adapter layers pass inputs straight to their base layers."""
    transformer.disable_lora()
    try:
        yield
    finally:
        transformer.enable_lora()


def gaussian_kl(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over batch and channels of KL(N(mu_p, var_p) || N(mu_t, var_t)), moments taken over H x W."""
    mu_p, var_p = prediction.mean((2, 3)), prediction.var((2, 3)) + eps
    mu_t, var_t = target.mean((2, 3)), target.var((2, 3)) + eps
    return (0.5 * (torch.log(var_t / var_p) + (var_p + (mu_p - mu_t) ** 2) / var_t - 1)).mean()


class SRObjective:
    """Computes the weighted loss of one micro-batch; holds the frozen DC-AE and the one-step operating point."""

    def __init__(self, pipe: SanaSRPipeline, config: LossConfig, lpips: torch.nn.Module | None = None,
                 teacher: torch.nn.Module | None = None):
        if config.lpips > 0 and lpips is None:
            raise ValueError("loss.lpips > 0 needs an LPIPS network (see sana_sr.train.perceptual.load_lpips)")
        self.pipe = pipe
        self.config = config
        self.lpips = lpips
        self.teacher = teacher
        self.sigma = pipe.sigma
        self.timestep = pipe.timestep

    def __call__(
        self,
        model: torch.nn.Module,
        transformer: torch.nn.Module,
        lq: torch.Tensor,
        gt: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Returns (total loss, {term: unweighted value}, sr in [0, 1]).

        `model` is what the accelerator prepared (DDP / DeepSpeed wrapper: its forward synchronises gradients);
        `transformer` is the same network unwrapped, for the extra passes of the regularisers.
        """
        cfg = self.config
        with torch.no_grad():
            upsampled = bicubic_upsample(lq, gt.shape[2], gt.shape[3]) * 2 - 1
            z_lq = self.pipe.encode(upsampled)
        terms: dict[str, torch.Tensor] = {}
        if self.teacher is None:
            z_hat = one_step_restore(model, z_lq, prompt_embeds, prompt_mask, self.timestep, self.sigma)
        else:
            z_hat, terms["distill"] = self.distilled_step(model, transformer, z_lq, prompt_embeds, prompt_mask)
        sr = self.pipe.decode(z_hat).float()
        target = gt * 2 - 1

        if cfg.pixel_l2 > 0:
            terms["pixel_l2"] = F.mse_loss(sr, target)
            with torch.no_grad():  # the same batch's bicubic error: progress is pixel_l2 / bicubic_l2, not pixel_l2
                terms["bicubic_l2"] = F.mse_loss(upsampled, target)
        if cfg.lpips > 0:
            terms["lpips"] = self.lpips(sr.clamp(-1, 1), target).mean()
        if cfg.prior_alignment > 0 or cfg.adapter_consistency > 0:
            batch = z_hat.shape[0]
            low, high = cfg.prior_timesteps
            t = low + (high - low) * torch.rand(batch, generator=generator, device=z_hat.device)
            s = (t / 1000).view(-1, 1, 1, 1)
            noise = torch.randn(z_hat.shape, generator=generator, device=z_hat.device, dtype=z_hat.dtype)
            noisy_hat = (1 - s) * z_hat + s * noise
            with adapter_disabled(transformer):
                frozen_on_hat = predict_velocity(transformer, noisy_hat, t, prompt_embeds, prompt_mask)
                if cfg.prior_alignment > 0:
                    with torch.no_grad():
                        z_hq = self.pipe.encode(target)
                        frozen_on_hq = predict_velocity(
                            transformer, (1 - s) * z_hq + s * noise, t, prompt_embeds, prompt_mask
                        )
                    terms["prior_alignment"] = gaussian_kl(frozen_on_hat.float(), frozen_on_hq.float())
            if cfg.adapter_consistency > 0:
                adapted = predict_velocity(transformer, noisy_hat, t, prompt_embeds, prompt_mask)
                terms["adapter_consistency"] = F.mse_loss(adapted.float(), frozen_on_hat.detach().float())

        weights = {"pixel_l2": cfg.pixel_l2, "lpips": cfg.lpips, "prior_alignment": cfg.prior_alignment,
                   "adapter_consistency": cfg.adapter_consistency, "distill": 1.0}
        total = sum(weights[name] * value for name, value in terms.items() if name in weights)
        return total, terms, ((sr.detach() + 1) / 2).clamp(0, 1)

    def distilled_step(self, model, transformer, z_lq, prompt_embeds, prompt_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's one step, and its weighted distillation loss against the teacher on the same input."""
        from compress import FeatureTap
        from compress.pruning.distill import DistillWeights, distillation_loss, feature_pairs

        def block_names(dit: torch.nn.Module) -> list[str]:
            return [f"transformer_blocks.{i}" for i in range(len(dit.transformer_blocks))]

        t = torch.full((z_lq.shape[0],), self.timestep, device=z_lq.device)
        with FeatureTap(transformer, block_names(transformer)) as student_features:
            velocity = predict_velocity(model, z_lq, t, prompt_embeds, prompt_mask)
        with torch.no_grad(), FeatureTap(self.teacher, block_names(self.teacher)) as teacher_features:
            teacher_velocity = predict_velocity(self.teacher, z_lq, t, prompt_embeds, prompt_mask)
        kept = getattr(transformer.config, "kept_blocks", None)
        pairs = feature_pairs(kept, len(transformer.transformer_blocks))
        loss, _ = distillation_loss(velocity, teacher_velocity, student_features.ordered(),
                                    teacher_features.ordered(), pairs,
                                    DistillWeights(self.config.distill_output, self.config.distill_features))
        return z_lq - self.sigma * velocity, loss
