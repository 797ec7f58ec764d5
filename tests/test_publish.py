"""`sana-sr publish`: the hub-ready folder reloads to the run's outputs, the card validates, uploads fail cleanly."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard

from sana_sr.model.loading import load_pipeline
from sana_sr.publish.publish import PublishError, main, validate_card

from .slurm_cluster import free_ports
from .train_helpers import REPO


@pytest.fixture(scope="module")
def trained_run(tiny_pipe, tmp_path_factory):
    """A run folder with the trained pipeline, its config and an evaluation (no compressed variant: quick)."""
    run = tmp_path_factory.mktemp("trained-run")
    tiny_pipe.save_pretrained(run / "train" / "final" / "pipeline")
    (run / "train" / "config.yaml").write_text("model:\n  preset: tiny\n")
    (run / "eval" / "trained").mkdir(parents=True)
    (run / "eval" / "trained" / "summary.json").write_text(
        '{"dataset": {"name": "held-back"}, "metrics": {"psnr": {"mean": 24.5, "higher_is_better": true, '
        '"images": 1}}}'
    )
    return run


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """A run folder as the main job leaves it: the trained run plus a compressed variant."""
    import shutil

    from sana_sr.quantization.compress import main as compress

    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(trained_run, run)
    assert compress([str(run / "train" / "final" / "pipeline"), "-o", str(run / "compress" / "compsrt-w4a4"),
                     "--calib-count", "4", "--calib-size", "32", "--batch-size", "2", "--steps", "2"]) == 0
    return run


def _outputs(folder, lq):
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(lq)


@pytest.mark.slow
def test_dry_run_needs_no_token_and_the_folder_reloads_to_the_run_outputs(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for variant in ("merged", "lora", "compsrt-w4a4"):
        out = tmp_path / variant
        assert main([str(run_dir), "--repo-id", "me/sana-sr-tiny", "--variant", variant, "--out", str(out),
                     "--dry-run"]) == 0
        listing = capsys.readouterr().out
        assert "README.md" in listing and "dry run: nothing uploaded" in listing
        source = run_dir / ("compress/compsrt-w4a4" if variant == "compsrt-w4a4" else "train/final/pipeline")
        published, original = _outputs(out, lq), _outputs(source, lq)
        if variant == "merged":  # folded adapter: same function, float rounding of W + BA
            torch.testing.assert_close(published, original, atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(published, original)
    merged = tmp_path / "merged"
    assert not (merged / "lora").exists() and (merged / "variants" / "compsrt-w4a4" / "compression.json").is_file()
    assert (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_model_card_validates(run_dir, tmp_path):
    main([str(run_dir), "--repo-id", "me/sana-sr-tiny", "--out", str(tmp_path / "p"), "--dry-run",
          "--dataset", "me/photos"])
    text = (tmp_path / "p" / "README.md").read_text()
    validate_card(text)
    card = ModelCard.load(tmp_path / "p" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "image-to-image"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["me/photos"]
    assert "| trained | held-back | psnr ↑ | 24.5 | 1 |" in card.text
    assert 'load_pipeline(snapshot_download("me/sana-sr-tiny"))' in card.text
    with pytest.raises(PublishError, match="pipeline_tag"):
        validate_card(text.replace("pipeline_tag: image-to-image", "pipeline_tag: text-to-image"))
    with pytest.raises(PublishError, match="not hub ids"):
        validate_card(text.replace("- me/photos", "- /local/folder"))


@pytest.mark.slow
def test_upload_without_network_fails_in_one_line_and_keeps_the_token_secret(run_dir, tmp_path):
    token = "hf_" + "x" * 34
    closed = free_ports(1)[0]  # nothing listens there: the hub is unreachable, and only loopback is tried
    env = {"HF_TOKEN": token, "HF_ENDPOINT": f"http://127.0.0.1:{closed}", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sana_sr.cli", "publish", str(run_dir), "--repo-id",
                             "me/sana-sr-tiny", "--out", str(tmp_path / "p")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("sana-sr publish: upload to me/sana-sr-tiny failed, nothing "
                                                     "was committed"), result.stderr
    assert token not in result.stdout + result.stderr
    assert not any(token in p.read_text(errors="ignore") for p in (tmp_path / "p").rglob("*.md"))

    missing = subprocess.run([sys.executable, "-m", "sana_sr.cli", "publish", str(run_dir), "--repo-id",
                              "me/sana-sr-tiny", "--out", str(tmp_path / "q")], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "HF_TOKEN"}, timeout=300)
    assert missing.returncode == 1 and "no Hugging Face token" in missing.stderr


def test_bad_arguments_are_one_line(trained_run, capsys):
    assert main([str(trained_run), "--repo-id", "not a repo", "--dry-run"]) == 1
    assert main([str(trained_run), "--repo-id", "me/x", "--variant", "w2a2", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not ORG/NAME" in err[0] and "variant 'w2a2' not in run" in err[1]


class FakeHub:
    """huggingface_hub.HfApi as far as `upload` uses it, with repos of known visibility and no network."""

    repos = {"me/public": False, "me/private": True, "me/broken": True}  # repo -> private
    calls: list[tuple] = []

    def __init__(self, token=None):
        self.token = token

    def repo_info(self, repo_id, repo_type=None):
        import httpx
        from huggingface_hub.errors import RepositoryNotFoundError

        if repo_id not in self.repos:
            request = httpx.Request("GET", f"https://hub.invalid/api/models/{repo_id}")
            raise RepositoryNotFoundError(f"404: {repo_id}", response=httpx.Response(404, request=request))
        return SimpleNamespace(private=self.repos[repo_id])

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create", repo_id, private))

    def upload_folder(self, folder_path, repo_id, commit_message, **kwargs):
        if repo_id == "me/broken":
            raise RuntimeError(f"401 Client Error: bad credentials Bearer {self.token}\nheaders: {self.token}")
        self.calls.append(("upload", repo_id))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")


def test_private_upload_onto_a_public_repo_is_refused_and_the_token_stays_secret(trained_run, tmp_path, monkeypatch,
                                                                                 capsys):
    import huggingface_hub

    token = "hf_" + "s" * 34
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.setattr(ModelCard, "validate", lambda self, repo_type=None: None)  # the hub's check is a request
    FakeHub.calls = []

    def publish(repo: str, *flags: str) -> tuple[int, list[str]]:
        code = main([str(trained_run), "--repo-id", repo, "--variant", "lora", "--out", str(tmp_path / repo), *flags])
        captured = capsys.readouterr()
        assert token not in captured.out + captured.err
        return code, captured.err.strip().splitlines()

    code, errors = publish("me/public", "--private")
    assert code == 1 and len(errors) == 1 and "me/public already exists and is public" in errors[0], errors
    assert FakeHub.calls == []  # neither created nor uploaded

    assert publish("me/private", "--private")[0] == 0
    assert publish("me/new", "--private")[0] == 0
    assert publish("me/public")[0] == 0  # without --private a public repo is what was asked for
    assert FakeHub.calls == [("create", "me/private", True), ("upload", "me/private"), ("create", "me/new", True),
                             ("upload", "me/new"), ("create", "me/public", False), ("upload", "me/public")]

    code, errors = publish("me/broken", "--private")
    assert code == 1 and len(errors) == 1 and "bad credentials Bearer ***" in errors[0], errors
