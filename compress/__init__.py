"""Model-agnostic compression for sana-sr (imports nothing from `sana_sr`). `compress.pruning`: structured pruning."""
