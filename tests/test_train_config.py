"""The training config: typed tree, YAML/TOML, overrides, errors that name the key, batch arithmetic."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sana_sr.train.config import ConfigError, TrainConfig, load_config, to_yaml

from .train_helpers import REPO, train_env


def test_defaults_file_and_overrides_in_order(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("optim:\n  lr: 1.0e-4\n  max_steps: 50\nmodel:\n  lora_rank: 16\n")
    config = load_config(config_file, ["optim.lr=3e-4", "--data.crop=256"])
    assert isinstance(config, TrainConfig)
    assert config.optim.lr == 3e-4  # command line beats file
    assert config.optim.max_steps == 50  # file beats defaults
    assert config.model.lora_rank == 16
    assert config.data.crop == 256
    assert config.optim.weight_decay == 0.01  # default
    assert config.model.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")


def test_toml_and_yaml_agree(tmp_path):
    (tmp_path / "a.toml").write_text('output_dir = "x"\n[optim]\nlr = 2e-5\nbetas = [0.8, 0.9]\n')
    (tmp_path / "a.yaml").write_text("output_dir: x\noptim:\n  lr: 2.0e-5\n  betas: [0.8, 0.9]\n")
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["optim.max_steps=7", "loss.prior_alignment=0.5"])
    (tmp_path / "resolved.yaml").write_text(to_yaml(config))
    assert load_config(tmp_path / "resolved.yaml") == config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "config error at optim.lrr: Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?"),
        (["optim.max_steps=many"], "config error at optim.max_steps"),
        (["model.lora_targets=5"], "config error at model.lora_targets"),
        (["dist.strategy=fsdp"], "dist.strategy must be 'ddp' or 'deepspeed', got 'fsdp'"),
        (["data.crop=250"], "data.crop 250 is not a multiple of model.upscale 4"),
        (["loss.prior_timesteps=[700,100]"], "loss.prior_timesteps must satisfy 0 <= low < high <= 1000"),
        (["model.vae_dtype=fp16"], "fp16 gives NaNs"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_in_file_is_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("loss:\n  pixel_l1: 1.0\n")
    with pytest.raises(ConfigError, match="loss.pixel_l1"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_batch_arithmetic_is_checked_with_the_numbers():
    optim = load_config(None, ["optim.micro_batch_size=4", "optim.global_batch_size=64"]).optim
    assert optim.accumulation(world_size=8) == 2
    assert optim.accumulation(world_size=16) == 1
    with pytest.raises(ValueError, match="global batch 64 is not micro batch 4 x world size 3"):
        optim.accumulation(world_size=3)


@pytest.mark.slow
def test_entry_point_rejects_a_bad_override_in_one_line():
    result = subprocess.run([sys.executable, "-m", "sana_sr.train", "optim.lrr=1"], capture_output=True, text=True,
                            env=train_env(), cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "optim.lrr" in result.stderr


def test_shipped_configs_load():
    for name in ("sana_0.6b.yaml", "sana_1.6b.yaml", "tiny.yaml"):
        config = load_config(REPO / "sana_sr" / "configs" / name)
        assert config.optim.global_batch_size % config.optim.micro_batch_size == 0


def test_preflight_passes_a_good_job_and_names_the_numbers_of_a_bad_one(tmp_path, capsys):
    """The job script's check before N trainers start: too few shards for the readers is one line with the numbers."""
    import json

    from sana_sr.train.preflight import main as preflight

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):
        (shards / f"shard-{i:06d}.tar").write_bytes(b"")
    (shards / "sizes.json").write_text(json.dumps({f"shard-{i:06d}.tar": 10 for i in range(4)}))
    config = str(REPO / "sana_sr" / "configs" / "tiny.yaml")
    assert preflight(["--world", "2", config, f"data.shards={shards}", "data.workers=2"]) == 0
    assert capsys.readouterr().err == ""
    assert preflight(["--world", "2", config, f"data.shards={shards}", "data.workers=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 shards" in err[0] and "8 readers" in err[0] and "--max-count 5" in err[0], err
    assert preflight(["--world", "2", config]) == 2  # no data.shards
    assert "data.shards is empty" in capsys.readouterr().err
