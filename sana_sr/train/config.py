"""The training config: one typed tree of dataclasses, loaded from YAML or TOML, overridden from the command line.

Precedence: command line > file > defaults. Unknown keys and values of the wrong type are rejected with the full
key in the message (OmegaConf structured configs); cross-field checks live in `__post_init__` and say the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from sana_sr.data.degradation_config import DegradationConfig
from sana_sr.distributed import DistConfig


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Model size: `tiny`, `sana-0.6b` or `sana-1.6b` (see sana_sr/presets.py)."""
    weights: str = "pretrained"
    """`pretrained` (the preset's hub ids; for tiny, the bundled base) or `random`."""
    path: str | None = None
    """A saved SanaSRPipeline folder or hub id to start from instead of the preset's weights."""
    vae_id: str | None = None
    """Hub id or local folder of the DC-AE, replacing the preset's (a local mirror laid out as the hub repo)."""
    base_id: str | None = None
    """Hub id or local folder of the SANA pipeline (transformer/, text_encoder/, tokenizer/), replacing the
    preset's."""
    text_encoder: bool = False
    """Encode shard captions with Gemma-2 during training. False: use precomputed prompt embeddings from the
    shards when present, else the pipeline's stored default (null) prompt."""
    lora_rank: int = 64
    """LoRA rank r (the release: 64)."""
    lora_alpha: float | None = None
    """LoRA alpha; None means alpha = rank."""
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module-name suffixes that get an adapter (both attentions by default; `conv_inverted`, `conv_point` too)."""
    timestep_index: int = 900
    """Scheduler index of the one step (900 of 1000 with shift 3: sigma* = 0.25)."""
    upscale: int = 4
    """Super-resolution factor."""
    vae_dtype: str = "fp32"
    """Precision of the frozen DC-AE: `fp32` or `bf16` (SANA users report NaNs in fp16)."""
    gradient_checkpointing: bool = False
    """Recompute DiT block activations in the backward pass to save memory."""
    finetune: str = "lora"
    """What trains: `lora` (a fresh adapter on the frozen DiT) or `full` (every DiT weight: the recovery fine-tune
    of a pruned DiT, whose pruned shapes a LoRA cannot change)."""
    teacher: str | None = None
    """An unpruned SanaSRPipeline folder to distil from (its LoRA merged): adds `loss.distill_*` terms."""

    def __post_init__(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.weights not in ("pretrained", "random"):
            raise ValueError(f"model.weights must be 'pretrained' or 'random', got {self.weights!r}")
        if self.vae_dtype not in ("fp32", "bf16"):
            raise ValueError(f"model.vae_dtype must be 'fp32' or 'bf16' (fp16 gives NaNs), got {self.vae_dtype!r}")


@dataclass
class DataConfig:
    shards: str = ""
    """Training shards: a folder written by `sana-sr shards`, its sizes.json, a brace pattern or `pipe:` URLs."""
    epoch_samples: int | None = None
    """Samples per epoch over all ranks (resampled shards: an epoch is a sample count); None: all in sizes.json."""
    crop: int = 512
    """Side of the random HQ crop; the LQ is crop / upscale."""
    workers: int = 2
    """Loader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Samples in each worker's shuffle buffer."""
    seed: int = 0
    """Base seed of the data order and the degradation kernel draws (per rank/worker/epoch seeds derive from it)."""
    prompt_embeds: bool = False
    """Condition on the prompt embeddings stored in the shards (`sana-sr shards --embeddings`)."""
    prompt_length: int | None = None
    """Tokens the stored embeddings are padded or cut to (needed with the degradation's pair queue)."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """Real-ESRGAN second-order degradation (x4plus values by default)."""
    max_bad_in_a_row: int = 1000
    """A loader worker that meets this many unusable samples in a row stops the run with one line naming the reason
    and the shards (all-bad data, e.g. prompt_embeds on shards without embeddings, would otherwise loop for ever)."""
    timeout_s: float = 600.0
    """Seconds to wait for a batch from the loader workers before the run stops (a worker stuck on a shard)."""


@dataclass
class LossConfig:
    pixel_l2: float = 1.0
    """Weight of the L2 between decode(z_hat) and the HQ image, in [-1, 1]."""
    lpips: float = 0.0
    """Weight of LPIPS-VGG (the release: 2.0). Needs the VGG weights locally; missing weights stop the run at start."""
    prior_alignment: float = 0.0
    """Weight of the frozen-prior alignment: KL between per-channel Gaussians of the frozen DiT's predictions on
    noised z_hat and on noised z_H (same noise)."""
    adapter_consistency: float = 0.0
    """Weight of the MSE between the LoRA DiT and the frozen DiT (detached) on noised z_hat."""
    prior_timesteps: tuple[int, int] = (70, 650)
    """Range of the timesteps t (sigma = t / 1000) at which the two regularisers noise the latents."""
    distill_output: float = 1.0
    """With `model.teacher`: weight of the MSE between the student's and the teacher's velocity at t*."""
    distill_features: float = 0.1
    """With `model.teacher`: weight of the block-feature MSE (each normalised by the teacher feature's power);
    student block i is matched with the teacher block it was cut from."""

    def __post_init__(self) -> None:
        low, high = self.prior_timesteps
        if not 0 <= low < high <= 1000:
            raise ValueError(f"loss.prior_timesteps must satisfy 0 <= low < high <= 1000, got {self.prior_timesteps}")
        if self.pixel_l2 + self.lpips + self.prior_alignment + self.adapter_consistency <= 0:
            raise ValueError("every loss weight is 0: nothing to train")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """AdamW learning rate (the release: 5e-5)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: str = "constant_with_warmup"
    """diffusers' `get_scheduler` name: constant_with_warmup, cosine, linear, ..."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    micro_batch_size: int = 4
    """Samples per rank per forward pass."""
    global_batch_size: int = 4
    """Samples per optimizer step over all ranks = micro_batch_size x accumulation x world size."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    ema_decay: float = 0.999
    """EMA decay of the trained weights (fp32 shadows of the fp32 masters, whatever the module's dtype); 0 disables
    the EMA."""
    ema_warmup: bool = True
    """Ramp the decay as diffusers' EMAModel does (the first update copies, then min(ema_decay, (1+s)/(10+s)));
    false: the first update copies, every later one uses ema_decay."""
    max_nonfinite_steps: int = 10
    """Abort after this many skipped micro-steps with a NaN/Inf loss."""

    def accumulation(self, world_size: int) -> int:
        """Gradient accumulation steps implied by the batch sizes; raises when they do not divide."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global batch {self.global_batch_size} is not micro batch {self.micro_batch_size} x world size "
                f"{world_size} x an integer accumulation"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save the full training state every this many optimizer steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a new one is in place."""
    resume: str | None = None
    """`latest` (the newest complete checkpoint in output_dir, if any), a checkpoint folder, or None."""

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1 (a step count), got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1 (0 would delete the checkpoint just written), "
                             f"got {self.keep_last}")


@dataclass
class LogConfig:
    tracker: str = "none"
    """`wandb` or `none`."""
    project: str = "sana-sr"
    """wandb project."""
    wandb_mode: str = "offline"
    """wandb mode: `offline` (no network needed; `wandb sync` later), `online` or `disabled`."""
    every_steps: int = 10
    """Log scalars every this many optimizer steps."""
    samples_every_steps: int = 200
    """Log an LQ | SR | HQ grid every this many optimizer steps (0: never)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    """Run folder: checkpoints, resolved config, logs, samples, final adapter."""
    seed: int = 0
    """Seed of the model init (random weights) and of the on-device randomness."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.data.degradation.scale != self.model.upscale:
            raise ValueError(
                f"data.degradation.scale {self.data.degradation.scale} differs from model.upscale {self.model.upscale}"
            )
        regularisers = self.loss.prior_alignment + self.loss.adapter_consistency
        if self.model.finetune == "full" and regularisers > 0:
            raise ValueError(
                f"loss.prior_alignment {self.loss.prior_alignment} and loss.adapter_consistency "
                f"{self.loss.adapter_consistency} need the frozen DiT behind a LoRA: set them to 0 with "
                "model.finetune=full"
            )
        if self.data.crop % self.model.upscale:
            raise ValueError(f"data.crop {self.data.crop} is not a multiple of model.upscale {self.model.upscale}")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message is one line."""


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        with open(path, "rb") as f:
            return tomllib.load(f)
    if path.suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path)) or {}
    raise ConfigError(f"config file {path} must be .yaml, .yml or .toml")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- file <- `key.sub=value` overrides, validated against `TrainConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.structured(TrainConfig)]
    try:
        if path is not None:
            layers.append(OmegaConf.create(_read_file(Path(path))))
        layers.append(OmegaConf.from_dotlist([o.removeprefix("--") for o in overrides]))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        lines = str(e).splitlines()
        key = next((line.split(":", 1)[1].strip() for line in lines if "full_key:" in line), "?")
        raise ConfigError(f"config error at {key}: {lines[0]}") from None
    except ValueError as e:
        raise ConfigError(f"config error: {e}") from None


def to_yaml(config: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: TrainConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config))
