"""Nothing the user owns is ever deleted (issue 16 item 5): a command replaces only a folder it wrote itself (the
marker it leaves), never its input, and stops with one line otherwise; rerunning over its own output still works."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sana_sr.atomic import MARKER, OutputError, atomic_directory, check_output, written_by
from sana_sr.cli import main as cli

from .conftest import ASSETS


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (names and bytes): equal snapshots mean the folder is untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def unrelated(tmp_path) -> Path:
    """A folder of the user's that some command is pointed at by mistake."""
    folder = tmp_path / "my-thesis"
    (folder / "chapters").mkdir(parents=True)
    (folder / "chapters" / "one.tex").write_text("\\chapter{One}\n")
    (folder / "model_index.json").write_text("{}\n")  # even one that looks like an output
    (folder / "run.json").write_text("{}\n")
    return folder


@pytest.fixture(scope="module")
def model(tiny_pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "pipeline"
    tiny_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory) -> Path:
    """A run folder with a trained pipeline, as `publish` reads it."""
    import shutil

    run = tmp_path_factory.mktemp("run")
    shutil.copytree(model, run / "train" / "final" / "pipeline")
    (run / "train" / "config.yaml").write_text("model:\n  preset: tiny\n")
    return run


# -- the rule ----------------------------------------------------------------------------------------------------
def test_atomic_directory_replaces_only_its_own_folders(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, "writer-a") as tmp:
        (tmp / "a.txt").write_text("1")
    assert written_by(target) == "writer-a"
    with atomic_directory(target, "writer-a") as tmp:  # a rerun replaces its own output
        (tmp / "a.txt").write_text("2")
    assert (target / "a.txt").read_text() == "2"
    with pytest.raises(OutputError, match="written by writer-a"):
        with atomic_directory(target, "writer-b"):
            pass
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match=f"no {MARKER} inside"):
        with atomic_directory(mine, "writer-a") as tmp:
            (tmp / "a.txt").write_text("x")
    assert snapshot(mine) == {"keep.txt": b"mine"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # its temporary folder is gone
    with atomic_directory(mine, "writer-a", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("x")
    assert set(snapshot(mine)) == {"a.txt", MARKER}
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty", "writer-a") as tmp:  # an empty folder is nobody's
        (tmp / "a.txt").write_text("x")


def test_outputs_apart_from_inputs(tmp_path):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    for output, relation in ((source, "is the input"), (source / "sub" / "q", "is inside the input"),
                             (tmp_path, "holds the input")):
        with pytest.raises(OutputError, match=relation):
            check_output(output, "w", inputs=[source], overwrite=True)  # --overwrite does not change that
    check_output(tmp_path / "elsewhere", "w", inputs=[source, "tiny", None])


def test_a_long_name_has_a_temporary_name_that_fits(tmp_path):
    name = "é" * 125 + ".png"  # 254 bytes of UTF-8: the temporary's longer name is cut, never refused
    with atomic_directory(tmp_path / name, "w") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / name / "x").is_file()


# -- every command --------------------------------------------------------------------------------------------------
def test_compress_model_onto_itself_is_refused_and_the_model_is_intact(model, capsys):
    before = snapshot(model)
    for output in (model, model / "quantized", model.parent):
        assert cli(["compress", str(model), "-o", str(output), "--method", "minmax", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "the input" in err, err
    assert snapshot(model) == before


def _commands(unrelated: Path, model: Path, run_dir: Path, tmp: Path) -> dict[str, list[str]]:
    photos = str(ASSETS / "photos")
    return {
        "compress -o": ["compress", str(model), "-o", str(unrelated), "--method", "minmax"],
        "compress --work-dir": ["compress", str(model), "-o", str(tmp / "q"), "--work-dir", str(unrelated)],
        "prune --out": ["prune", "tiny-random", "--out", str(unrelated), "--target-params", "0.5"],
        "publish --out": ["publish", str(run_dir), "--repo-id", "me/x", "--dry-run", "--out", str(unrelated)],
        "pretrain-tiny --out": ["pretrain-tiny", "--out", str(unrelated)],
        "pretrain-tiny --work-dir": ["pretrain-tiny", "--out", str(tmp / "base"), "--work-dir", str(unrelated)],
        "quickstart --out": ["quickstart", "--out", str(unrelated)],
        "quickstart --fresh": ["quickstart", "--out", str(unrelated), "--fresh"],
        "evaluate -o": ["evaluate", "--lr", photos, "--model", str(model), "-o", str(unrelated)],
        "shards -o": ["shards", photos, "-o", str(unrelated), "--no-progress", "--workers", "1"],
    }


@pytest.mark.parametrize("command", ["compress -o", "compress --work-dir", "prune --out", "publish --out",
                                     "pretrain-tiny --out", "pretrain-tiny --work-dir", "quickstart --out",
                                     "quickstart --fresh", "evaluate -o", "shards -o"])
def test_an_unrelated_folder_survives_every_command(command, unrelated, model, run_dir, tmp_path, capsys):
    before = snapshot(unrelated)
    argv = _commands(unrelated, model, run_dir, tmp_path)[command]
    assert cli(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(unrelated) in err[0] and ("not written by" in err[0] or "written by" in err[0]), err
    assert snapshot(unrelated) == before and not (unrelated / MARKER).exists()


@pytest.mark.slow
def test_commands_rerun_over_their_own_output(model, tmp_path, capsys):
    q = tmp_path / "q"
    args = ["compress", str(model), "-o", str(q), "--method", "minmax", "--wbits", "8", "--abits", "0",
            "--calib-count", "2", "--calib-size", "32", "--batch-size", "2"]
    assert cli(args) == 0 and cli(args) == 0
    assert written_by(q) == "sana-sr compress" and not (tmp_path / "q.work").exists()
    pruned = tmp_path / "pruned"
    args = ["prune", "tiny-random", "--out", str(pruned), "--target-params", "0.5", "--importance", "magnitude"]
    assert cli(args) == 0 and cli(args) == 0
    assert json.loads((pruned / "pruning.json").read_text())["source"] == "tiny-random"
    # Another command's output is not this one's: prune does not replace a compressed folder, unless told to.
    assert cli([*args[:2], "--out", str(q), *args[4:]]) == 2
    assert "written by sana-sr compress" in capsys.readouterr().err
    assert cli([*args[:2], "--out", str(q), *args[4:], "--overwrite"]) == 0 and written_by(q) == "sana-sr prune"


def test_quickstart_fresh_deletes_only_its_own_run_folder(tmp_path, monkeypatch):
    from sana_sr.main_job import quickstart

    monkeypatch.setattr(quickstart, "STAGES", {})  # the folder handling only, not the stages
    run = tmp_path / "run"
    assert quickstart.main(["--out", str(run)]) == 0 and written_by(run) == "sana-sr quickstart"
    (run / "stale.txt").write_text("from an earlier run")
    assert quickstart.main(["--out", str(run)]) == 0 and (run / "stale.txt").is_file()  # continues in its folder
    assert quickstart.main(["--out", str(run), "--fresh"]) == 0 and not (run / "stale.txt").exists()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is Python 3.11+")
def test_main_job_commands_run_from_inside_a_run_folder(tmp_path, monkeypatch):
    from sana_sr.main_job import stages

    (tmp_path / "compress").mkdir()  # a run folder's output, named as the top-level package
    monkeypatch.chdir(tmp_path)
    stages.call(stages.cli(["compress", "--help"]), "sana-sr compress --help")  # raises if `compress` is shadowed
