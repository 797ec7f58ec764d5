"""`accelerate launch -m tests.ema_probe [CONFIG] [key=value ...]`: the SANA-SR trainer, also recording the weight
trajectory the EMA should average, for tests/test_deepspeed_bf16.py.

After every optimizer step every rank reads the trained weights' fp32 masters through DeepSpeed's own public
accessor (`safe_get_full_fp32_param`, collective), or the parameters themselves without DeepSpeed; rank 0 writes
them to OUTPUT_DIR/trajectory.pt at the end. Independent of how sana_sr keeps its EMA, so the test can judge it.
"""

from __future__ import annotations

import sys

import torch

from sana_sr.distributed import exit_code, process_group_released
from sana_sr.train.config import load_config
from sana_sr.train.trainer import Trainer


class TrajectoryTrainer(Trainer):
    trajectory: list[dict[str, torch.Tensor]]

    def on_optimizer_step(self, step: int, extra: object) -> None:
        super().on_optimizer_step(step, extra)
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                master = safe_get_full_fp32_param(param)
                weights[name] = (param.detach().float() if master is None else master).cpu().clone()
        if self.accelerator.is_main_process:
            self.trajectory = getattr(self, "trajectory", []) + [weights]

    def export_final(self) -> None:
        super().export_final()
        if self.accelerator.is_main_process:
            torch.save(self.trajectory, self.output_dir / "trajectory.pt")


def main(argv: list[str]) -> int:
    path = argv[0] if argv and "=" not in argv[0] else None
    with process_group_released():
        return TrajectoryTrainer(load_config(path, argv[1:] if path else argv)).train()


if __name__ == "__main__":
    sys.exit(exit_code(main(sys.argv[1:])))
