"""The optimisation loop every fine-tune in sana-sr runs on: the SR training (`Trainer`) and the quantization
fine-tunes of `sana-sr compress` (`sana_sr.train.quant`). Parallelism is the accelerator's business.

Batch arithmetic: global batch = micro batch x accumulation x world size, checked at start. One "step" is one
optimizer step. A micro-step whose loss is NaN/Inf on any rank is skipped on every rank (no backward), and so is an
update whose gradient norm is not finite (gradients are all-reduced, so every rank sees the same norm); both are
counted and the run aborts after `optim.max_nonfinite_steps` of them. (Under DeepSpeed a skip that falls on an
accumulation boundary defers that update to the next boundary; DeepSpeed checks its own gradient norm.)

A subclass supplies the model (`prepare`), `batches()`, `compute_loss(batch)` and `export_final()`; the loop owns
the optimizer step, logging, checkpoints, resume, the replica check and stop signals.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed

from sana_sr.atomic import atomic_file
from sana_sr.distributed import build_accelerator
from sana_sr.model.lora import has_lora
from sana_sr.train.checkpoint import keep_only_trainable, load_checkpoint, resolve_resume, save_checkpoint
from sana_sr.train.config import CheckpointConfig, DistConfig, LogConfig, OptimConfig
from sana_sr.train.ema import MasterEMA
from sana_sr.train.sharded import full_masters, gathered
from sana_sr.train.tracking import REQUEUE_EXIT_CODE, MetricsLog, StopRequest, tracker_names


@dataclass
class Window:
    """Loss sums and timings between two logged steps."""

    sums: dict[str, float] = field(default_factory=dict)
    finite_steps: int = 0
    micro_steps: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, float], finite: bool) -> None:
        self.micro_steps += 1
        if finite:
            self.finite_steps += 1
            for key, value in values.items():
                self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> list[float]:
        return [self.sums[k] / max(1, self.finite_steps) for k in sorted(self.sums)]


class TrainLoop:
    def __init__(self, output_dir: str | Path, optim: OptimConfig, dist: DistConfig, checkpoint: CheckpointConfig,
                 log: LogConfig, seed: int, ddp_kwargs: dict | None = None):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.optim, self.checkpoint_config, self.log_config = optim, checkpoint, log
        self.accumulation = optim.accumulation(world)
        self.accelerator = build_accelerator(dist, self.accumulation, optim.micro_batch_size, optim.grad_clip,
                                             tracker_names(log), ddp_kwargs)
        self.output_dir = Path(output_dir)
        set_seed(seed)  # same model init on every rank
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "skipped_samples": 0,
                      "nonfinite_steps": 0}
        self.data_digest, self.samples_local = hashlib.sha256().hexdigest(), 0
        self.skipped_local = 0  # this rank's bad samples: per rank in the checkpoint (state[...] holds the sum)
        self.metrics = MetricsLog(self.accelerator, self.output_dir)
        self.stop = StopRequest()
        self.ema = None

    def print(self, message: str) -> None:
        """Once per run: Accelerator.print prints on every node's local rank 0."""
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # -- set-up ------------------------------------------------------------------------------------------------
    def prepare(self, module: torch.nn.Module, param_groups: list[dict], ema: bool = False) -> None:
        """AdamW over `param_groups` (each may set its own lr), the LR schedule, the accelerator's wrapping of
        `module`, and an fp32 EMA of the trained weights' masters when `ema` and optim.ema_decay > 0."""
        from diffusers.optimization import get_scheduler

        acc, optim = self.accelerator, self.optim
        self.module = module
        # DeepSpeed bf16 casts the module in place; exports write each tensor back in the dtype it had here.
        self.dtypes = {name: tensor.dtype for name, tensor in module.state_dict().items()}
        self.trainable_names = {n for n, p in module.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas),
                                      weight_decay=optim.weight_decay)
        # Accelerate steps a prepared scheduler once per process per optimizer step.
        scheduler = get_scheduler(optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps * acc.num_processes,
                                  num_training_steps=optim.max_steps * acc.num_processes)
        acc.register_save_state_pre_hook(keep_only_trainable(self.trainable_names))
        self.model, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        if ema and optim.ema_decay > 0:
            # Built after prepare: under DeepSpeed the fp32 masters exist only now (and the module may be bf16).
            self.ema = MasterEMA(self.trainable(), optim.ema_decay, optim.ema_warmup)

    @contextmanager
    def outside_zero3(self):
        """A block in which transformers' `from_pretrained` builds whole modules under ZeRO-3, for the frozen helpers
        that never go through `prepare` (the text encoder, a teacher): it partitions with zero.Init whenever
        Accelerate's DeepSpeed config is registered, which Accelerate does whatever its zero3_init flag says."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None or not plugin.hf_ds_config.is_zero3():
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def trained_state(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """{name: whole fp32 tensor} of the trained weights: the optimizer's masters, or the EMA. Collective under
        DeepSpeed (every rank calls it; every rank gets the result)."""
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        tensors = self.ema.full() if ema else full_masters(self.trainable())
        return dict(zip(names, tensors, strict=True))

    def resume(self) -> Path | None:
        """Load the checkpoint that checkpoint.resume names, if any; returns it."""
        acc = self.accelerator
        path = resolve_resume(acc, self.output_dir, self.checkpoint_config.resume)
        if path is not None:
            self.state, rank_state = load_checkpoint(acc, path)
            self.data_digest, self.samples_local = rank_state["data_digest"], rank_state["samples"]
            # A checkpoint from before per-rank counts has rank 0's only: better short on other ranks than repeated.
            old = self.state["skipped_samples"] if acc.is_main_process else 0
            self.skipped_local = rank_state.get("skipped_samples", old)
            self.load_rank_state(rank_state)
            if self.ema is not None:
                self.ema.load_state_dict(rank_state["ema"])
            self.print(f"resumed from {path} at step {self.state['step']}")
        return path

    # -- what a subclass supplies ------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """Micro-batches from the saved data position on; each has a `key` list naming its samples."""
        raise NotImplementedError

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
        """(loss, {term: value}, anything `on_optimizer_step` wants), run under the accelerator's autocast."""
        raise NotImplementedError

    def rank_state(self) -> dict:
        """What differs per rank beyond the data position (generators, queues)."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        pass

    def on_optimizer_step(self, step: int, extra: object) -> None:
        pass

    def export_final(self) -> None:
        pass

    def end(self) -> None:
        """Close the trackers and the process group (Accelerate's end_training): the run is over."""
        self.accelerator.end_training()

    # -- one micro-batch ---------------------------------------------------------------------------------------
    def micro_step(self, batch: dict) -> tuple[dict[str, float], bool, object]:
        acc = self.accelerator
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, terms, extra = self.compute_loss(batch)
            finite = acc.reduce(torch.isfinite(loss.detach()).float().view(1), reduction="sum").item()
            ok = finite == acc.num_processes
            if ok:
                acc.backward(loss)
                if acc.sync_gradients and acc.distributed_type != DistributedType.DEEPSPEED:
                    norm = acc.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip or math.inf)
                    if not torch.isfinite(norm):  # one inf/NaN gradient would poison every weight it reaches
                        self.optimizer.zero_grad(set_to_none=True)
                        ok = False
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        values = {k: v.item() for k, v in terms.items()} | {"loss": loss.item()}
        return values, ok, extra

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to `optim.max_steps`; returns 0, or REQUEUE_EXIT_CODE after saving on a stop signal."""
        acc = self.accelerator
        window = Window()
        batches = self.batches()
        finished_before = self.state["step"] >= self.optim.max_steps  # resumed from the final checkpoint
        try:
            while self.state["step"] < self.optim.max_steps:
                fetch_start = time.perf_counter()
                batch = next(batches)  # fetched only when a step remains: the data position saved is exact
                window.data_wait += time.perf_counter() - fetch_start
                self.skipped_local += int(batch.get("skipped", 0))
                # A chained digest of the sample keys this rank consumed: resumable, and different per rank.
                digest = hashlib.sha256(bytes.fromhex(self.data_digest) + "\n".join(batch["key"]).encode())
                self.data_digest = digest.hexdigest()
                self.samples_local += len(batch["key"])
                values, ok, extra = self.micro_step(batch)
                window.add(values, ok)
                if not ok:
                    self.state["nonfinite_steps"] += 1
                    self.print(f"non-finite loss or gradient at step {self.state['step']}: micro-step skipped "
                               f"({self.state['nonfinite_steps']} so far)")
                    if self.state["nonfinite_steps"] > self.optim.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"{self.state['nonfinite_steps']} non-finite losses > optim.max_nonfinite_steps="
                            f"{self.optim.max_nonfinite_steps}: stopping"
                        )
                if acc.sync_gradients:
                    if self.after_optimizer_step(window, extra):
                        window = Window()
                    if self.stop.agreed(acc):
                        self.checkpoint()
                        self.request_requeue()
                        self.end()
                        return REQUEUE_EXIT_CODE
            if not finished_before:
                self.checkpoint()
            self.export_final()
            self.end()
            return 0
        finally:
            # Closing the stream ends its loader workers; after an error they would otherwise outlive the loop, and
            # the interpreter's exit would wait on them forever (they ignore SIGTERM: see sana_sr.data.streaming).
            batches.close()
            self.stop.close()

    def after_optimizer_step(self, window: Window, extra: object) -> bool:
        """Bookkeeping after an optimizer step; True when the logging window was flushed."""
        self.state["step"] += 1
        self.state["samples"] += self.optim.global_batch_size
        step = self.state["step"]
        if self.ema is not None:
            self.ema.update()
        self.on_optimizer_step(step, extra)
        if step % self.checkpoint_config.every_steps == 0 and step < self.optim.max_steps:
            self.checkpoint()
        if step % self.log_config.every_steps == 0 or step == self.optim.max_steps:
            self.log_scalars(window)
            return True
        return False

    def log_scalars(self, window: Window) -> None:
        acc = self.accelerator
        names = sorted(window.sums)
        local = torch.tensor([*window.means(), window.data_wait], device=acc.device)
        rows = acc.gather(local.view(1, -1)).view(acc.num_processes, -1)
        waits = rows[:, -1].tolist()
        skipped = self.skipped_total()
        seconds = time.perf_counter() - window.start
        samples = window.micro_steps * self.optim.micro_batch_size * acc.num_processes
        metrics = {f"loss/{k}": v for k, v in zip(names, rows[:, :-1].mean(0).tolist())}
        metrics |= {
            "lr": self.scheduler.get_last_lr()[0],
            "throughput/samples_per_s": samples / max(seconds, 1e-9),
            "throughput/data_wait_s_max_rank": max(waits),
            "throughput/data_wait_s_mean": sum(waits) / len(waits),
            "data/skipped_samples": int(skipped),
            "nonfinite_steps": self.state["nonfinite_steps"],
            # This process's peak so far (rank 0's): what sizes a CPU node, and the GPU's on a GPU.
            "memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if acc.device.type == "cuda":
            metrics["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self.metrics.log(metrics, self.state["step"])
        self.print(f"step {self.state['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def skipped_total(self) -> int:
        """Bad samples met by all ranks (collective)."""
        count = torch.tensor([float(self.skipped_local)], device=self.accelerator.device)
        return int(self.accelerator.reduce(count, "sum").item())

    def request_requeue(self) -> None:
        """Leave the marker the Slurm script turns into `scontrol requeue` (exit codes do not survive launchers)."""
        marker = os.environ.get("SANA_SR_REQUEUE_FILE")
        self.print(f"stop signal: saved step {self.state['step']}, exiting for requeue")
        if marker and self.accelerator.is_main_process:
            with atomic_file(marker) as tmp:
                tmp.write_text(f"{self.state['step']}\n")

    def replica_report(self) -> list[dict]:
        """Gather every rank's view (world size, trainable-weight checksum, data seen) and check the replicas agree.

        Data parallelism means identical weights after steps on different data: a mismatch is a desync bug and
        stops the run rather than training diverged copies.
        """
        acc = self.accelerator
        with gathered(self.trainable()):  # ZeRO-3 ranks hold empty placeholders otherwise
            weights = torch.cat([p.detach().double().flatten() for p in self.trainable()])
        position = torch.arange(1, weights.numel() + 1, dtype=torch.float64, device=weights.device)
        mine = {
            "rank": acc.process_index, "world_size": acc.num_processes, "samples": self.samples_local,
            "weights_checksum": [float(weights.sum()), float((weights * position.sin()).sum())],
            "data_digest": self.data_digest,
        }
        from accelerate.utils import gather_object

        reports = gather_object([mine]) if acc.num_processes > 1 else [mine]
        if any(r["weights_checksum"] != reports[0]["weights_checksum"] for r in reports):
            raise RuntimeError(f"replicas diverged at step {self.state['step']}: {reports}")
        return reports

    def checkpoint(self) -> Path:
        reports = self.replica_report()
        if self.accelerator.is_main_process:
            with atomic_file(self.output_dir / "replicas.json") as tmp:
                tmp.write_text(json.dumps({"step": self.state["step"], "ranks": reports}, indent=2) + "\n")
        self.state["skipped_samples"] = self.skipped_total()
        rank_state = {"data_digest": self.data_digest, "samples": self.samples_local,
                      "skipped_samples": self.skipped_local} | self.rank_state()
        if self.ema is not None:  # each rank's own shadows: they are partitioned as the masters are
            rank_state["ema"] = self.ema.state_dict()
        lora = self.trained_state() if has_lora(self.module) else None  # collective: every rank gathers
        return save_checkpoint(self.accelerator, self.output_dir, self.state["step"], self.module, dict(self.state),
                               rank_state, self.checkpoint_config.keep_last, lora)
