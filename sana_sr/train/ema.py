"""EMA of the trained weights with fp32 shadows, over the fp32 master weights, whatever the module's dtype.

Under DeepSpeed bf16 the module's parameters are bf16 copies of fp32 masters that the optimizer keeps, partitioned
over the ranks (ZeRO-1/2: each rank holds a slice of the flattened trainable weights; ZeRO-3: a slice of every
parameter, and the module holds empty placeholders). An EMA built from the module's tensors would be bf16, and at
decay 0.999 the update 0.001 * (p - s) rounds to zero: the exported weights would freeze near their early values.
So each rank keeps fp32 shadows of exactly the master slices it owns and updates them from those masters: no
communication per step, and memory partitioned as the optimizer state is. `full()` assembles whole tensors (a
collective: every rank calls it) for export. Without DeepSpeed the master is the parameter itself.

Decay schedule: diffusers' EMAModel warm-up by default (the first update copies, then min(decay, (1 + s) / (10 + s))),
so that short runs do not export weights dominated by the initial ones; `warmup=False` keeps the first copy and uses
`decay` for every later update.
"""

from __future__ import annotations

import torch

from sana_sr.train.sharded import assemble, master_slice


class MasterEMA:
    """fp32 EMA of `params`' master weights; each rank holds the shadows of the master slices it owns."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.slices = [master_slice(p) for p in params]
        self.shadows = [s.read().detach().clone().float() for s in self.slices]
        self.updates = 0

    def current_decay(self) -> float:
        """Decay of the update about to be made (diffusers' EMAModel schedule when warming up)."""
        step = self.updates  # updates made before this one
        if step == 0:
            return 0.0
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- shadow - (1 - d) * (shadow - master), in fp32, on this rank's slices."""
        weight = 1.0 - self.current_decay()
        for shadow, s in zip(self.shadows, self.slices):
            if s.length:
                shadow.sub_((shadow - s.read().float()).mul_(weight))
        self.updates += 1

    def full(self) -> list[torch.Tensor]:
        """The whole EMA tensors, fp32, shaped as the parameters (collective under DeepSpeed)."""
        return assemble(self.slices, self.shadows)

    def state_dict(self) -> dict:
        """This rank's shadows (they differ per rank when partitioned: saved with the rank's own state)."""
        return {"updates": self.updates, "decay": self.decay, "warmup": self.warmup,
                "slices": [(s.start, s.length) for s in self.slices], "shadows": [t.cpu() for t in self.shadows]}

    def load_state_dict(self, state: dict) -> None:
        mine = [(s.start, s.length) for s in self.slices]
        saved = [tuple(x) for x in state["slices"]]
        if saved != mine:
            raise ValueError(f"EMA checkpoint holds {len(saved)} slices that do not match this rank's {len(mine)} "
                             "(different model, world size or ZeRO stage): resume with the run's own settings")
        self.updates = int(state["updates"])
        for shadow, saved_shadow in zip(self.shadows, state["shadows"]):
            shadow.copy_(saved_shadow)
