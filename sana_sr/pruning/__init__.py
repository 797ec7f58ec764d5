"""Prompt-aware structured pruning of the SANA DiT: the SANA side of `compress.pruning` (the DiT's structure, the
pruned DiT class, calibration with prompts) and the `sana-sr prune` command."""
