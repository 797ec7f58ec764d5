"""The training loop. It knows the model and the objective; parallelism is the accelerator's business.

Batch arithmetic: global batch = micro batch x accumulation x world size, checked at start. One "step" is one
optimizer step. A micro-step whose loss is NaN/Inf on any rank is skipped on every rank (no backward), counted,
and the run aborts after `optim.max_nonfinite_steps` of them. (Under DeepSpeed a skip that falls on an
accumulation boundary defers that update to the next boundary.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed

from ..atomic import atomic_file
from ..build import build_pipeline
from ..lora import LoraSettings, add_lora, save_lora
from ..pipeline import SanaSRPipeline
from .checkpoint import keep_only_trainable, load_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig, to_dict, to_yaml
from .distributed import build_accelerator
from .objective import SRObjective
from .tracking import REQUEUE_EXIT_CODE, MetricsLog, StopRequest, sample_grid, save_samples, tracker_names


# Depthwise-conv weight grads come out channels-last on CPU; DDP copies them into its bucket (correct, just a copy).
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def load_model(config: TrainConfig) -> SanaSRPipeline:
    """The pipeline to adapt: a saved one, or the preset's weights; a fresh LoRA on the DiT, everything else frozen."""
    m = config.model
    if m.path:
        pipe = SanaSRPipeline.from_pretrained(m.path, load_lora_adapter=False)
    else:
        pipe = build_pipeline(m.preset, weights=m.weights, text_encoder=m.text_encoder, seed=config.seed)
    pipe.register_to_config(upscale=m.upscale, timestep_index=m.timestep_index)
    if not m.text_encoder and pipe.text_encoder is not None:
        pipe.drop_text_encoder()
    pipe.set_progress_bar_config(disable=True)
    if m.finetune == "lora":
        add_lora(pipe.transformer, LoraSettings(rank=m.lora_rank, alpha=m.lora_alpha, target_modules=m.lora_targets))
    for name, param in pipe.transformer.named_parameters():
        param.requires_grad_(m.finetune == "full" or ".lora_" in name)
    if m.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    pipe.transformer.train()
    return pipe


def load_teacher(path: str, device: torch.device) -> torch.nn.Module:
    """The frozen DiT to distil from: a saved pipeline's transformer with its LoRA merged."""
    teacher = SanaSRPipeline.from_pretrained(path)
    teacher.merge_lora()
    return teacher.transformer.to(device).eval().requires_grad_(False)


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


class Trainer:
    def __init__(self, config: TrainConfig):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from ..data.degradation import RealESRGANDegradation
        from ..data.streaming import LoaderConfig, make_loader

        self.config = config
        cfg = config
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accumulation = cfg.optim.accumulation(world)
        self.accelerator = acc = build_accelerator(
            cfg.dist, self.accumulation, cfg.optim.micro_batch_size, cfg.optim.grad_clip, tracker_names(cfg.log)
        )
        self.output_dir = Path(cfg.output_dir)
        set_seed(cfg.seed)  # same model init on every rank

        self.pipe = load_model(cfg)
        self.pipe.vae.to(acc.device)
        if cfg.model.vae_dtype == "bf16":
            self.pipe.vae.to(torch.bfloat16)
        for part in (self.pipe.text_encoder, self.pipe.default_prompt):
            if part is not None:
                part.to(acc.device)
        self.transformer = self.pipe.transformer
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        self.trainable_names = {n for n, p in self.transformer.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(
            trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
        scheduler = get_scheduler(
            cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps * acc.num_processes,
            num_training_steps=cfg.optim.max_steps * acc.num_processes,
        )
        acc.register_save_state_pre_hook(keep_only_trainable(self.trainable_names))
        self.model, self.optimizer, self.scheduler = acc.prepare(self.transformer, optimizer, scheduler)
        self.ema = None
        if cfg.optim.ema_decay > 0:
            self.ema = EMAModel(trainable, decay=cfg.optim.ema_decay)
            acc.register_for_checkpointing(self.ema)

        lpips = None
        if cfg.loss.lpips > 0:
            from .perceptual import load_lpips

            lpips = load_lpips(acc.device)
        teacher = load_teacher(cfg.model.teacher, acc.device) if cfg.model.teacher else None
        self.objective = SRObjective(self.pipe, cfg.loss, lpips, teacher)
        d = cfg.data
        loader_config = LoaderConfig(
            batch_size=cfg.optim.micro_batch_size, mode="resampled", num_workers=d.workers, crop_size=d.crop,
            shuffle_buffer=d.shuffle_buffer, shuffle_initial=min(100, d.shuffle_buffer), epoch_samples=d.epoch_samples,
            seed=d.seed, prompt_embeds=d.prompt_embeds, prompt_length=d.prompt_length,
            pin_memory=acc.device.type == "cuda",
        )
        self.loader = make_loader(d.shards, loader_config, degradation=d.degradation, rank=acc.process_index,
                                  world_size=acc.num_processes)
        self.degradation = RealESRGANDegradation(cfg.data.degradation, acc.device)
        self.generator = torch.Generator(acc.device).manual_seed(cfg.seed * 1009 + acc.process_index)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "skipped_samples": 0,
                      "nonfinite_steps": 0}
        self.data_digest, self.samples_local = hashlib.sha256().hexdigest(), 0
        self.metrics = MetricsLog(acc, self.output_dir)
        self.stop = StopRequest()

        resume = resolve_resume(acc, self.output_dir, cfg.checkpoint.resume)
        if resume is not None:
            self.state, rank_state = load_checkpoint(acc, resume)
            self.generator.set_state(rank_state["generator"])
            self.data_digest, self.samples_local = rank_state["data_digest"], rank_state["samples"]
            self.degradation.load_state_dict(rank_state["degradation"])
            self.print(f"resumed from {resume} at step {self.state['step']}")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.output_dir / "config.yaml") as f:
                f.write_text(to_yaml(cfg))
        acc.init_trackers(cfg.log.project, config=to_dict(cfg))
        self.print(
            f"world {acc.num_processes} ({acc.distributed_type}), global batch {cfg.optim.global_batch_size} = "
            f"micro {cfg.optim.micro_batch_size} x accumulation {self.accumulation} x world {acc.num_processes}, "
            f"{sum(p.numel() for p in trainable)} trainable parameters"
        )

    def print(self, message: str) -> None:
        """Once per run: Accelerator.print prints on every node's local rank 0."""
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # -- one micro-batch ------------------------------------------------------------------------------------
    def prompts(self, batch: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(device), batch["prompt_mask"].to(device)
        if self.pipe.text_encoder is not None:
            return self.pipe.encode_prompt(list(batch["caption"]), size)
        return self.pipe.encode_prompt(None, size)

    def micro_step(self, batch: dict) -> tuple[dict[str, float], bool, tuple]:
        acc = self.accelerator
        lq, gt = self.degradation(batch, self.generator)
        embeds, mask = self.prompts(batch, lq.shape[0])
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, terms, sr = self.objective(self.model, self.transformer, lq, gt, embeds, mask, self.generator)
            finite = acc.reduce(torch.isfinite(loss.detach()).float().view(1), reduction="sum").item()
            ok = finite == acc.num_processes
            if ok:
                acc.backward(loss)
                if acc.sync_gradients and acc.distributed_type != DistributedType.DEEPSPEED:
                    acc.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        values = {k: v.item() for k, v in terms.items()} | {"loss": loss.item()}
        return values, ok, (lq, sr, gt)

    # -- the loop ---------------------------------------------------------------------------------------------
    def batches(self):
        """Batches from the current data position on; epochs are re-seeded, so a resumed run replays the same
        stream: the batches consumed before the checkpoint are fetched and dropped (no model work)."""
        while True:
            self.loader_epoch(self.state["epoch"])
            skip = self.state["batch_in_epoch"]
            for index, batch in enumerate(self.loader):
                if index < skip:
                    continue
                self.state["batch_in_epoch"] = index + 1
                yield batch
            self.state["epoch"] += 1
            self.state["batch_in_epoch"] = 0

    def loader_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def train(self) -> int:
        """Run to `optim.max_steps`; returns 0, or REQUEUE_EXIT_CODE after saving on a stop signal."""
        cfg, acc = self.config, self.accelerator
        window = Window()
        batches = self.batches()
        while self.state["step"] < cfg.optim.max_steps:
            fetch_start = time.perf_counter()
            batch = next(batches)  # fetched only when a step remains: the data position saved is exact
            window.data_wait += time.perf_counter() - fetch_start
            self.state["skipped_samples"] += int(batch.get("skipped", 0))
            # A chained digest of the sample keys this rank consumed: resumable, and different per rank.
            self.data_digest = hashlib.sha256(bytes.fromhex(self.data_digest) + "\n".join(batch["key"]).encode())
            self.data_digest = self.data_digest.hexdigest()
            self.samples_local += len(batch["key"])
            values, ok, images = self.micro_step(batch)
            window.add(values, ok)
            if not ok:
                self.state["nonfinite_steps"] += 1
                self.print(f"non-finite loss at step {self.state['step']}: micro-step skipped "
                          f"({self.state['nonfinite_steps']} so far)")
                if self.state["nonfinite_steps"] > cfg.optim.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{self.state['nonfinite_steps']} non-finite losses > optim.max_nonfinite_steps="
                        f"{cfg.optim.max_nonfinite_steps}: stopping"
                    )
            if acc.sync_gradients:
                if self.after_optimizer_step(window, images):
                    window = Window()
                if self.stop.agreed(acc):
                    self.checkpoint()
                    self.request_requeue()
                    acc.end_training()
                    return REQUEUE_EXIT_CODE
        self.checkpoint()
        self.export_final()
        acc.end_training()
        return 0

    def after_optimizer_step(self, window: "Window", images) -> bool:
        """Bookkeeping after an optimizer step; True when the logging window was flushed."""
        cfg, acc = self.config, self.accelerator
        self.state["step"] += 1
        self.state["samples"] += cfg.optim.global_batch_size
        step = self.state["step"]
        if self.ema is not None:
            self.ema.step([p for p in self.transformer.parameters() if p.requires_grad])
        if cfg.log.samples_every_steps and step % cfg.log.samples_every_steps == 0:
            lq, sr, gt = images
            save_samples(acc, self.output_dir, step, sample_grid(lq, sr, gt))
        if step % cfg.checkpoint.every_steps == 0 and step < cfg.optim.max_steps:
            self.checkpoint()
        if step % cfg.log.every_steps == 0 or step == cfg.optim.max_steps:
            self.log_scalars(window)
            return True
        return False

    def log_scalars(self, window: "Window") -> None:
        acc = self.accelerator
        names = sorted(window.sums)
        local = torch.tensor([*window.means(), window.data_wait], device=acc.device)
        gathered = acc.gather(local.view(1, -1)).view(acc.num_processes, -1)
        waits = gathered[:, -1].tolist()
        skipped = acc.reduce(torch.tensor([float(self.state["skipped_samples"])], device=acc.device), "sum").item()
        seconds = time.perf_counter() - window.start
        samples = window.micro_steps * self.config.optim.micro_batch_size * acc.num_processes
        metrics = {f"loss/{k}": v for k, v in zip(names, gathered[:, :-1].mean(0).tolist())}
        metrics |= {
            "lr": self.scheduler.get_last_lr()[0],
            "throughput/samples_per_s": samples / max(seconds, 1e-9),
            "throughput/data_wait_s_max_rank": max(waits),
            "throughput/data_wait_s_mean": sum(waits) / len(waits),
            "data/skipped_samples": int(skipped),
            "nonfinite_steps": self.state["nonfinite_steps"],
        }
        self.metrics.log(metrics, self.state["step"])
        self.print(f"step {self.state['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def request_requeue(self) -> None:
        """Leave the marker the Slurm script turns into `scontrol requeue` (exit codes do not survive launchers)."""
        marker = os.environ.get("SANA_SR_REQUEUE_FILE")
        self.print(f"stop signal: saved step {self.state['step']}, exiting for requeue")
        if marker and self.accelerator.is_main_process:
            with atomic_file(marker) as tmp:
                tmp.write_text(f"{self.state['step']}\n")

    def rank_state(self) -> dict:
        return {"generator": self.generator.get_state(), "degradation": self.degradation.state_dict(),
                "data_digest": self.data_digest, "samples": self.samples_local}

    def replica_report(self) -> list[dict]:
        """Gather every rank's view (world size, trainable-weight checksum, data seen) and check the replicas agree.

        Data parallelism means identical weights after steps on different data: a mismatch is a desync bug and
        stops the run rather than training diverged copies.
        """
        acc = self.accelerator
        weights = torch.cat([p.detach().double().flatten() for p in self.transformer.parameters() if p.requires_grad])
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
        return save_checkpoint(
            self.accelerator, self.output_dir, self.state["step"], self.transformer, dict(self.state),
            self.rank_state(), self.config.checkpoint.keep_last,
        )

    def export_final(self) -> None:
        """`final/lora` (last weights) and `final/lora_ema` (the EMA) when training a LoRA, and `final/pipeline`
        (loadable by SanaSRPipeline.from_pretrained) with the EMA weights."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        final = self.output_dir / "final"
        lora = self.config.model.finetune == "lora"
        if lora:
            save_lora(self.transformer, final / "lora")
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        if self.ema is not None:
            self.ema.store(trainable)
            self.ema.copy_to(trainable)
            if lora:
                save_lora(self.transformer, final / "lora_ema")
        self.pipe.save_pretrained(final / "pipeline")
        if self.ema is not None:
            self.ema.restore(trainable)
        self.print(f"final weights written to {final} ({len(trainable)} trained tensors)")
