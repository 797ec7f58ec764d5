"""The quantization fine-tunes of `sana-sr compress`, run on the training loop (sana_sr/train/loop.py).

`compress.quantize` hands each fine-tune (2DQuant/CompSRT bound calibration, SPR²Q rectifier training, SPR²Q static
routing) to `QuantizeConfig.trainer`; `sana-sr compress` plugs in `finetune_on_loop`, so these fine-tunes get what
the training run has: one process or many (`accelerate launch`, torchrun, srun: DDP, each rank taking its share of
the calibration batches, gradients averaged), the non-finite step guard, `metrics.jsonl`, the replica check, and
checkpoints in the work folder. A stopped or killed `sana-sr compress` rerun with the same work folder redoes the
(deterministic) calibration and resumes each fine-tune from its newest checkpoint.

The loss is compress's (`compress.finetune.distill_loss`: L1 to the full-precision output + λ·block-feature MSE), the
optimizer Adam (AdamW without decay) with cosine annealing: the same fine-tune as `compress.finetune.distill`, which
the package keeps for models outside sana-sr.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import find_batch_size, send_to_device
from torch import nn

from compress.features import FeatureTap, first_tensor
from compress.finetune import distill_loss
from sana_sr.train.config import CheckpointConfig, DistConfig, LogConfig, OptimConfig
from sana_sr.train.loop import TrainLoop
from sana_sr.train.tracking import REQUEUE_EXIT_CODE


class FinetuneStopped(RuntimeError):
    """A stop signal arrived during a fine-tune; its state is saved in the work folder."""


@dataclass
class QuantLoopSettings:
    """Where and how the fine-tunes of one `sana-sr compress` run keep their state."""

    work_dir: Path
    """One sub-folder per fine-tune (`compsrt-bounds`, `spr2q-rectifiers`, ...): checkpoints, metrics.jsonl,
    replicas.json."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps (and at the end of each fine-tune, and on SIGTERM/SIGUSR1)."""
    log_every: int = 10
    """Log the loss every this many steps."""
    seed: int = 0
    """Seed of the loop's random state."""


class QuantFinetune(TrainLoop):
    """One fine-tune: `student` learns to match `teacher` on the calibration batches; only `param_groups` change."""

    def __init__(self, student: nn.Module, teacher: nn.Module, batches: Sequence, param_groups: list[dict], *,
                 steps: int, forward: Callable, feature_modules: Sequence[str], feature_weight: float,
                 grad_clip: float | None, desc: str, settings: QuantLoopSettings, progress: Callable | None = None):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if len(batches) < world:
            raise ValueError(f"{len(batches)} calibration batches cannot be shared by {world} processes: use at least "
                             f"{world} (calibration crops >= {world} x batch size)")
        micro = find_batch_size(batches[0])
        optim = OptimConfig(lr=param_groups[0]["lr"], weight_decay=0.0, schedule="cosine", warmup_steps=0,
                            max_steps=steps, micro_batch_size=micro, global_batch_size=micro * world,
                            grad_clip=grad_clip or 0.0, ema_decay=0.0)
        # fp32: the fine-tune fits the rounding error of low-bit codes to an fp32 teacher; bf16 would add its own.
        dist = DistConfig(strategy="ddp", mixed_precision="no")
        name = re.sub(r"[^a-z0-9]+", "-", desc.lower()).strip("-")
        checkpoint = CheckpointConfig(every_steps=settings.checkpoint_every, keep_last=1, resume="latest")
        log = LogConfig(tracker="none", every_steps=settings.log_every, samples_every_steps=0)
        # Buffers (pruning masks, units) are calibration results, identical on every rank: broadcasting them every
        # forward would move a mask as large as the weights. Accelerate's DDP kwargs know `broadcast_buffers` only.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
        super().__init__(settings.work_dir / name, optim, dist, checkpoint, log, settings.seed,
                         ddp_kwargs=dict(broadcast_buffers=False))
        acc = self.accelerator
        self.desc, self.forward, self.feature_weight, self.progress = desc, forward, feature_weight, progress
        mine = list(enumerate(batches))[acc.process_index::acc.num_processes]
        self.local = [{"key": [f"calib-{i}/{j}" for j in range(find_batch_size(b))],
                       "inputs": send_to_device(b, acc.device)} for i, b in mine]
        # compress calibrates and finalizes where the model was given: it goes back there after the fine-tune.
        self.home = next(student.parameters()).device
        self.teacher = teacher.to(acc.device)
        self.prepare(student, param_groups)
        self.student_tap = FeatureTap(student, feature_modules)
        self.teacher_tap = FeatureTap(teacher, feature_modules)
        self.cache: dict[str, tuple[torch.Tensor, dict]] = {}
        self.step_losses: list[float] = []
        self.bar = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume()

    def batches(self):
        while True:  # one micro-batch per optimizer step (accumulation 1): the position is the step
            yield self.local[self.state["step"] % len(self.local)]

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict, None]:
        key = batch["key"][0]
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = (first_tensor(self.forward(self.teacher, batch["inputs"])).detach(),
                                   self.teacher_tap.pop())
        target, target_features = self.cache[key]
        out = first_tensor(self.forward(self.model, batch["inputs"]))
        return distill_loss(out, target, self.student_tap.pop(), target_features, self.feature_weight), {}, None

    def micro_step(self, batch: dict):
        values, ok, extra = super().micro_step(batch)
        if ok:
            self.step_losses.append(values["loss"])
        return values, ok, extra

    def on_optimizer_step(self, step: int, extra: object) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.step_losses[-1]:.4g}" if self.step_losses else "-", refresh=False)

    def end(self) -> None:
        """No trackers to close, and the process group must outlive this fine-tune (the next one uses it)."""

    def run(self) -> list[float]:
        """Train; returns the loss of every step this process ran (averaged over ranks)."""
        acc = self.accelerator
        if self.progress is not None and acc.is_main_process:
            self.bar = self.progress(total=self.optim.max_steps, initial=self.state["step"], desc=self.desc)
        try:
            code = self.train()
        finally:
            for closable in (self.bar, self.student_tap, self.teacher_tap):
                if closable is not None:
                    closable.close()
            self.optimizer.zero_grad(set_to_none=True)
        losses = torch.tensor(self.step_losses, dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1 and losses.numel():
            losses = acc.reduce(losses, reduction="mean")
        acc.free_memory()  # drop the DDP wrapper: the next fine-tune wraps the student with other trainables
        self.module.to(self.home)
        self.teacher.to(self.home)
        if code == REQUEUE_EXIT_CODE:
            raise FinetuneStopped(f"{self.desc}: stopped by a signal at step {self.state['step']} of "
                                  f"{self.optim.max_steps}, saved in {self.output_dir}")
        return losses.tolist()


def finetune_on_loop(student: nn.Module, teacher: nn.Module, batches: Sequence, param_groups: list[dict], *,
                     steps: int, forward: Callable, feature_modules: Sequence[str] = (), feature_weight: float = 1.0,
                     grad_clip: float | None = 1.0, progress: Callable | None = None, desc: str = "fine-tune",
                     settings: QuantLoopSettings) -> list[float]:
    """`compress.finetune.distill`'s signature and loss on the training loop (bind `settings` with partial)."""
    param_groups = [g for g in param_groups if g["params"]]
    if steps <= 0 or not param_groups or not batches:
        return []
    return QuantFinetune(student, teacher, batches, param_groups, steps=steps, forward=forward,
                         feature_modules=feature_modules, feature_weight=feature_weight, grad_clip=grad_clip,
                         desc=desc, settings=settings, progress=progress).run()
