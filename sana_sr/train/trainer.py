"""SANA-SR training: the model, the data stream and the objective on the shared loop (sana_sr/train/loop.py, which
owns the optimizer step, checkpoints, resume, logging and the replica check)."""

from __future__ import annotations

import warnings

import torch

from sana_sr.atomic import atomic_file
from sana_sr.model.loading import build_pipeline
from sana_sr.model.lora import LoraSettings, add_lora, enable_adapter_aware_checkpointing, save_lora
from sana_sr.model.pipeline import SanaSRPipeline
from sana_sr.train.config import TrainConfig, to_dict, to_yaml
from sana_sr.train.loop import TrainLoop
from sana_sr.train.objective import SRObjective
from sana_sr.train.sharded import module_state
from sana_sr.train.tracking import sample_grid, save_samples

# Depthwise-conv weight grads come out channels-last on CPU; DDP copies them into its bucket (correct, just a copy).
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def load_model(config: TrainConfig) -> SanaSRPipeline:
    """The pipeline to adapt: a saved one, or the preset's weights; a fresh LoRA on the DiT, everything else frozen."""
    m = config.model
    if m.path:
        pipe = SanaSRPipeline.from_pretrained(m.path, load_lora_adapter=False)
    else:
        pipe = build_pipeline(m.preset, weights=m.weights, text_encoder=m.text_encoder, seed=config.seed,
                              vae_id=m.vae_id, base_id=m.base_id)
    pipe.register_to_config(upscale=m.upscale, timestep_index=m.timestep_index)
    if not m.text_encoder and pipe.text_encoder is not None:
        pipe.drop_text_encoder()
    pipe.set_progress_bar_config(disable=True)
    if m.finetune == "lora":
        add_lora(pipe.transformer, LoraSettings(rank=m.lora_rank, alpha=m.lora_alpha, target_modules=m.lora_targets))
    for name, param in pipe.transformer.named_parameters():
        param.requires_grad_(m.finetune == "full" or ".lora_" in name)
    if m.gradient_checkpointing:
        enable_adapter_aware_checkpointing(pipe.transformer)
    pipe.transformer.train()
    return pipe


def load_teacher(path: str, device: torch.device) -> torch.nn.Module:
    """The frozen DiT to distil from: a saved pipeline's transformer with its LoRA merged."""
    teacher = SanaSRPipeline.from_pretrained(path)
    teacher.merge_lora()
    return teacher.transformer.to(device).eval().requires_grad_(False)


class Trainer(TrainLoop):
    def __init__(self, config: TrainConfig):
        from sana_sr.data.degradation import RealESRGANDegradation
        from sana_sr.data.streaming import LoaderConfig, make_loader

        self.config = cfg = config
        super().__init__(cfg.output_dir, cfg.optim, cfg.dist, cfg.checkpoint, cfg.log, cfg.seed)
        acc = self.accelerator
        lpips = None
        if cfg.loss.lpips > 0:  # first: missing LPIPS weights stop the run before the model is even loaded
            from sana_sr.train.perceptual import load_lpips

            lpips = load_lpips(acc.device)

        # Under ZeRO-3, transformers' from_pretrained would partition the text encoder (and the teacher) with
        # zero.Init, leaving them unusable outside the engine: only the prepared DiT is DeepSpeed's to partition.
        with self.outside_zero3():
            self.pipe = load_model(cfg)
            teacher = load_teacher(cfg.model.teacher, acc.device) if cfg.model.teacher else None
        self.pipe.vae.to(acc.device)
        if cfg.model.vae_dtype == "bf16":
            self.pipe.vae.to(torch.bfloat16)
        for part in (self.pipe.text_encoder, self.pipe.default_prompt):
            if part is not None:
                part.to(acc.device)
        self.transformer = self.pipe.transformer
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        self.prepare(self.transformer, [{"params": trainable}], ema=True)

        self.objective = SRObjective(self.pipe, cfg.loss, lpips, teacher)
        d = cfg.data
        loader_config = LoaderConfig(
            batch_size=cfg.optim.micro_batch_size, mode="resampled", num_workers=d.workers, crop_size=d.crop,
            shuffle_buffer=d.shuffle_buffer, shuffle_initial=min(100, d.shuffle_buffer), epoch_samples=d.epoch_samples,
            seed=d.seed, prompt_embeds=d.prompt_embeds, prompt_length=d.prompt_length,
            pin_memory=acc.device.type == "cuda", max_bad_in_a_row=d.max_bad_in_a_row, timeout_s=d.timeout_s,
            hq_uint8=True,  # the degradation makes the floats on the device: 4x fewer bytes from the workers and to it
            prompt_dim=self.transformer.config.caption_channels,
        )
        self.loader = make_loader(d.shards, loader_config, degradation=d.degradation, rank=acc.process_index,
                                  world_size=acc.num_processes)
        self.degradation = RealESRGANDegradation(cfg.data.degradation, acc.device)
        self.generator = torch.Generator(acc.device).manual_seed(cfg.seed * 1009 + acc.process_index)

        self.resume()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.output_dir / "config.yaml") as f:
                f.write_text(to_yaml(cfg))
        acc.init_trackers(cfg.log.project, config=to_dict(cfg))
        self.print(
            f"world {acc.num_processes} ({acc.distributed_type}), global batch {cfg.optim.global_batch_size} = "
            f"micro {cfg.optim.micro_batch_size} x accumulation {self.accumulation} x world {acc.num_processes}, "
            f"{sum(getattr(p, 'ds_numel', p.numel()) for p in trainable)} trainable parameters"
        )

    # -- one micro-batch ------------------------------------------------------------------------------------
    def prompts(self, batch: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(device), batch["prompt_mask"].to(device)
        if self.pipe.text_encoder is not None:
            return self.pipe.encode_prompt(list(batch["caption"]), size)
        return self.pipe.encode_prompt(None, size)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple]:
        lq, gt = self.degradation(batch, self.generator)
        embeds, mask = self.prompts(batch, lq.shape[0])
        loss, terms, sr = self.objective(self.model, self.transformer, lq, gt, embeds, mask, self.generator)
        return loss, terms, (lq, sr, gt)

    def batches(self):
        """Batches from the current data position on; epochs are re-seeded, so a resumed run replays the same
        stream: the batches consumed before the checkpoint are fetched and dropped (no model work)."""
        from sana_sr.data.samples import DataStreamError

        while True:
            self.loader_epoch(self.state["epoch"])
            skip, fetched = self.state["batch_in_epoch"], 0
            for index, batch in enumerate(self.loader):
                fetched += 1
                if index < skip:
                    continue
                self.state["batch_in_epoch"] = index + 1
                yield batch
            if fetched == 0:  # the next epoch would be empty too: looping over them would hang the run
                raise DataStreamError(f"epoch {self.state['epoch']} gave no batch from {self.config.data.shards}")
            self.state["epoch"] += 1
            self.state["batch_in_epoch"] = 0

    def loader_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def on_optimizer_step(self, step: int, images: tuple) -> None:
        every = self.config.log.samples_every_steps
        if every and step % every == 0:
            save_samples(self.accelerator, self.output_dir, step, sample_grid(*images))

    def rank_state(self) -> dict:
        return {"generator": self.generator.get_state(), "degradation": self.degradation.state_dict()}

    def load_rank_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.degradation.load_state_dict(state["degradation"])

    def export_final(self) -> None:
        """`final/lora` (last weights) and `final/lora_ema` (the EMA) when training a LoRA, and `final/pipeline`
        (loadable by SanaSRPipeline.from_pretrained) with the EMA weights.

        The trained tensors are the optimizer's fp32 masters and the fp32 EMA, never the module's copies (bf16 under
        DeepSpeed bf16, empty placeholders under ZeRO-3); the frozen base is gathered and written in the dtype it
        was loaded in. Gathering is collective, so every rank runs this; rank 0 writes."""
        acc = self.accelerator
        last = self.trained_state()
        ema = self.trained_state(ema=True) if self.ema is not None else None
        base = module_state(self.transformer, self.dtypes, keep=acc.is_main_process)
        if not acc.is_main_process:
            return
        final = self.output_dir / "final"
        if self.config.model.finetune == "lora":
            save_lora(self.transformer, final / "lora", last)
            if ema is not None:
                save_lora(self.transformer, final / "lora_ema", ema)
        exported = ema if ema is not None else last
        state = base | {name: tensor.to(self.dtypes[name]) for name, tensor in exported.items()}
        self.pipe.save_pretrained(final / "pipeline", transformer_state=state)
        self.print(f"final weights written to {final} ({len(exported)} trained tensors)")
