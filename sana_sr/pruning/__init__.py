"""Prompt-aware structured pruning of the SANA DiT: the SANA side of `compress.pruning` (the DiT's structure in
`dit_structure`, its `PrunableStructure` in `structure`, the pruned DiT class in `model`, calibration with prompts
in `prompt_aware`) and the `sana-sr prune` command (`prune`)."""
