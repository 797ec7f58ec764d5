"""`sana-sr COMMAND ...`: one console entry point; each command is a module with `main(argv) -> int`."""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules are imported only when their command runs, so `--help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("sana_sr.main_job.quickstart", "run the main job on the bundled photos with the tiny preset (CPU)"),
    "upscale": ("sana_sr.model.upscale", "restore image files and folders"),
    "train": ("sana_sr.train.__main__", "train the one-step LoRA DiT (python -m sana_sr.train CONFIG ...)"),
    "pretrain-tiny": ("sana_sr.train.pretrain_tiny", "train the tiny base or (--recipe sr) tiny-sr from photos"),
    "cost": ("sana_sr.model.cost", "parameters and MACs per component (meta device), latency and peak memory"),
    "shards": ("sana_sr.data.shards", "image folders (LSDIR, FFHQ, any tree) -> webdataset tar shards"),
    "embed-captions": ("sana_sr.data.caption_embeddings", "add the text encoder's caption embeddings to existing shards"),
    "compress": ("sana_sr.quantization.compress", "low-bit quantization (CompSRT, SPR²Q, baselines) with a packed export"),
    "evaluate": ("sana_sr.evaluation.evaluate", "score a model on RealSR / DRealSR / DIV2K-Val / LR folders (= eval/realsr.py)"),
    "publish": ("sana_sr.publish.publish", "build a hub-ready folder with a model card from a run and upload it (one commit)"),
    "prune": ("sana_sr.pruning.prune", "prompt-aware structured pruning of the DiT (heads, channels, blocks)"),
}


def _usage() -> str:
    lines = ["usage: sana-sr COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `sana-sr COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sana-sr: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


def run() -> None:
    """The console script: `main`, then the exit that survives a process group (sana_sr.distributed.exit_code)."""
    from sana_sr.distributed import exit_code

    sys.exit(exit_code(main()))


if __name__ == "__main__":
    run()
