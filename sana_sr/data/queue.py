"""Real-ESRGAN's training-pair pool: mixes degraded pairs across batches.

One batch shares its resize scale, interpolation mode, noise kind and stage order; drawing the returned rows from a
pool of earlier batches gives every batch a mix of them. Each row's other entries (caption, key, prompt embedding,
kernels...) travel with it through the pool.
"""

from __future__ import annotations

import torch


def _rows(batch: dict, b: int) -> list[str]:
    """Names of the per-row entries of `batch`: tensors with b rows and lists of length b."""
    names = []
    for name, value in batch.items():
        if name == "hq":
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b:
            names.append(name)
        elif isinstance(value, list) and len(value) == b:
            names.append(name)
    return names


class TrainingPairQueue:
    """Pool of `size` rows (rounded down to a multiple of the batch size). While filling, a batch passes through
    unchanged; once full, each batch goes in and a uniformly drawn set of as many pooled rows comes out (Real-ESRGAN
    shuffles the pool and takes the first rows, which draws the same way but copies the whole pool each step)."""

    def __init__(self, size: int):
        self.size = size
        self.capacity = 0
        self.filled = 0
        self.pool: dict[str, torch.Tensor | list] = {}

    def state_dict(self) -> dict:
        """The pool's content: a resumed run draws from the same rows as an uninterrupted one."""
        pool = {k: v.cpu() if isinstance(v, torch.Tensor) else list(v) for k, v in self.pool.items()}
        on_device = [k for k, v in self.pool.items() if isinstance(v, torch.Tensor) and v.device.type != "cpu"]
        return {"size": self.size, "capacity": self.capacity, "filled": self.filled, "pool": pool,
                "on_device": on_device}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore a pool saved by `state_dict`; rows that lived on the accelerator go to `device`."""
        if state["size"] != self.size:
            raise ValueError(f"checkpoint queue holds {state['size']} rows, this config {self.size}")
        self.capacity, self.filled = state["capacity"], state["filled"]
        self.pool = {
            k: (v.to(device) if k in state["on_device"] else v) if isinstance(v, torch.Tensor) else list(v)
            for k, v in state["pool"].items()
        }

    def exchange(self, rows: dict[str, torch.Tensor], batch: dict, generator: torch.Generator | None) -> dict:
        """Put `rows` (lq, hq[, gt]: tensors of B rows) and the per-row entries of `batch` in; take B rows out.

        Returns the new lq/hq; rewrites the per-row entries of `batch` in place to match them."""
        b = rows["lq"].shape[0]
        if self.size < b:
            return rows
        if self.capacity == 0:
            self.capacity = self.size // b * b
        if self.capacity % b:
            return rows  # a batch of another size (a last, partial one) bypasses the pool
        extras = {name: batch[name] for name in _rows(batch, b)}
        entries = {**rows, **extras}
        if self.filled < self.capacity:
            self._store(entries, torch.arange(self.filled, self.filled + b), b)
            self.filled += b
            return rows
        device = generator.device if generator is not None else "cpu"
        slots = torch.randperm(self.capacity, generator=generator, device=device)[:b].cpu()
        taken = self._take(slots)
        self._store(entries, slots, b)
        for name in extras:
            batch[name] = taken[name]
        return {name: taken[name] for name in rows}

    def _store(self, entries: dict, slots: torch.Tensor, b: int) -> None:
        for name, value in entries.items():
            if isinstance(value, list):
                pool = self.pool.setdefault(name, [None] * self.capacity)
                for slot, item in zip(slots.tolist(), value, strict=True):
                    pool[slot] = item
                continue
            pool = self.pool.get(name)
            if pool is None:
                pool = value.new_zeros((self.capacity, *value.shape[1:]))
                self.pool[name] = pool
            elif pool.shape[1:] != value.shape[1:]:
                raise ValueError(
                    f"training-pair queue: {name!r} rows changed shape from {tuple(pool.shape[1:])} to "
                    f"{tuple(value.shape[1:])}; give every batch the same shape (for prompt embeddings set "
                    "LoaderConfig.prompt_length) or set DegradationConfig.queue_size = 0"
                )
            pool[slots.to(pool.device)] = value.to(pool.device, pool.dtype)

    def _take(self, slots: torch.Tensor) -> dict:
        taken = {}
        for name, pool in self.pool.items():
            if isinstance(pool, list):
                taken[name] = [pool[i] for i in slots.tolist()]
            else:
                taken[name] = pool[slots.to(pool.device)].clone()
        return taken
