"""`[accelerate launch -m] tests.checkpoint_probe OUTPUT_DIR [key=value ...]`: the shared training loop
(sana_sr/train/loop.py) on a model of a few hundred weights, for the checkpoint tests (tests/test_checkpoint_safety.py).

Seconds per run instead of the SANA preset's minutes, with the same checkpoint files: Accelerate's state (DDP) or
DeepSpeed's (ZeRO-2/3, fp32 or bf16), the per-rank `rank{r}.pt`, `trainer_state.json`. Batches are a function of
(rank, micro-step), so a resumed run replays exactly what an uninterrupted one sees.

Keys: steps, every (checkpoint.every_steps), keep (keep_last), resume (latest | a folder | none), strategy
(ddp | deepspeed), config (DeepSpeed JSON), precision (no | bf16), resave (1: save the resumed step again at
once, as a stop signal right after a resume does).

Fault injection, for the SIGKILL test: with `PROBE_KILL_AT=N` the process SIGKILLs itself at the N-th file-system
event inside a checkpoint save (a tensor file written, an fsync, a rename, a deletion), counted from the start of
this run. Odd events die before the call; even ones die halfway: half of a file written, half of a folder's files
deleted, or just after the call.
`PROBE_EVENTS=FILE` writes the number of events the run went through.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from sana_sr.distributed import DistConfig, process_group_released
from sana_sr.train.config import CheckpointConfig, LogConfig, OptimConfig
from sana_sr.train.loop import TrainLoop

EVENTS = {"count": 0, "armed": False}


def _event(kind: str) -> str:
    """Count one event during a save; returns 'before', 'half' or '' (go on)."""
    if not EVENTS["armed"]:
        return ""
    EVENTS["count"] += 1
    target = int(os.environ.get("PROBE_KILL_AT", "0"))
    if EVENTS["count"] != target:
        return ""
    print(f"probe: SIGKILL at event {target} ({kind})", flush=True)
    return "before" if target % 2 else "half"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_fault_injection() -> None:
    """Wrap the calls a checkpoint save makes to the file system; each is one event."""
    torch_save = torch.save

    def save(obj, f, *args, **kwargs):
        when = _event(f"torch.save {f}")
        if when == "before":
            _die()
        if when == "half" and isinstance(f, str | os.PathLike):
            import io

            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
            _die()
        return torch_save(obj, f, *args, **kwargs)

    torch.save = save
    rmtree = shutil.rmtree

    def remove_tree(path, *args, **kwargs):
        when = _event(f"rmtree {path}")
        if when == "before":
            _die()
        if when == "half":  # a deletion cut short: half of the files gone
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for file in files[: max(1, len(files) // 2)]:
                file.unlink()
            _die()
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = remove_tree
    for module, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (os, "unlink")):
        original = getattr(module, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            when = _event(f"{_name} {args[0] if args else ''}")
            if when == "before":
                _die()
            try:
                return _original(*args, **kwargs)
            finally:  # also when the call raised (unlink(missing_ok=True) of a file already renamed)
                if when == "half":
                    _die()

        setattr(module, name, wrapped)


class ProbeLoop(TrainLoop):
    """Learns a fixed random linear map; the first layer is frozen (as the DiT base under a LoRA)."""

    def __init__(self, output_dir: str, options: dict[str, str]):
        steps = int(options.get("steps", 6))
        optim = OptimConfig(lr=1e-2, max_steps=steps, micro_batch_size=2, global_batch_size=2 * _world(),
                            ema_decay=0.9, max_nonfinite_steps=0, warmup_steps=2, schedule="cosine")
        dist = DistConfig(strategy=options.get("strategy", "ddp"), cpu=True,
                          deepspeed_config=options.get("config", "deepspeed_zero2.json"),
                          mixed_precision=options.get("precision", "no"))
        resume = options.get("resume", "latest")
        checkpoint = CheckpointConfig(every_steps=int(options.get("every", 1)), keep_last=int(options.get("keep", 2)),
                                      resume=None if resume == "none" else resume)
        super().__init__(output_dir, optim, dist, checkpoint, LogConfig(every_steps=1000), seed=0)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        module[0].requires_grad_(False)
        self.target = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        self.prepare(module, [{"params": [p for p in module.parameters() if p.requires_grad]}], ema=True)
        if self.resume() is not None and options.get("resave") == "1":
            self.checkpoint()  # what a stop signal right after a resume does: save the same step again

    def batches(self):
        while True:
            index = self.state["batch_in_epoch"]
            self.state["batch_in_epoch"] = index + 1
            g = torch.Generator().manual_seed(1000 * index + self.accelerator.process_index)
            x = torch.randn(2, 8, generator=g)
            yield {"x": x, "y": x @ self.target, "key": [f"{index}-{i}" for i in range(2)]}

    def compute_loss(self, batch: dict):
        out = self.model(batch["x"].to(self.accelerator.device, self.model_dtype))
        loss = torch.nn.functional.mse_loss(out.float(), batch["y"].to(out.device))
        return loss, {}, None

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def checkpoint(self) -> Path:
        EVENTS["armed"] = True
        try:
            path = super().checkpoint()
        finally:
            EVENTS["armed"] = False
        self.print(f"probe: saved step {self.state['step']}")
        return path

    def export_final(self) -> None:
        state = self.trained_state()
        ema = self.trained_state(ema=True)
        if self.accelerator.is_main_process:
            torch.save({"weights": state, "ema": ema, "step": self.state["step"]}, self.output_dir / "final.pt")


def train(out: Path, **options) -> dict:
    """Run the probe loop in this process (one rank); its final weights and EMA."""
    loop = ProbeLoop(str(out), {k: str(v) for k, v in options.items()})
    assert loop.train() == 0
    return torch.load(out / "final.pt", weights_only=True)


def assert_bitwise(a: dict, b: dict) -> None:
    """Two runs' final weights and EMA are the same bits."""
    assert a["step"] == b["step"]
    for part in ("weights", "ema"):
        assert a[part].keys() == b[part].keys() and a[part]
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str]) -> int:
    output_dir, options = argv[0], dict(a.split("=", 1) for a in argv[1:])
    if os.environ.get("PROBE_KILL_AT") or os.environ.get("PROBE_EVENTS"):
        _install_fault_injection()
    with process_group_released():
        try:
            loop = ProbeLoop(output_dir, options)
        except ValueError as e:  # a refused checkpoint (CheckpointError): one line, as sana_sr.train prints it
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            return loop.train()
        finally:
            if os.environ.get("PROBE_EVENTS"):
                Path(os.environ["PROBE_EVENTS"]).write_text(str(EVENTS["count"]))


if __name__ == "__main__":
    from sana_sr.distributed import exit_code

    sys.exit(exit_code(main(sys.argv[1:])))
