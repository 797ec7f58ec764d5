"""What to keep: a cost model of the DiT in its widths, and plans that meet a parameter or MAC target.

Every counted cost of a SANA block is linear in its head and channel counts (projections, the linear attention's
two products, the cross-attention's products with the text tokens, the 1x1 and depthwise convs), so

    cost = fixed + sum over kept blocks of (block + heads * c_h + cross_heads * c_x + channels * c_c)

holds exactly; `CostModel.measure` reads the coefficients off a counter applied to a few tiny meta-device models
and checks the linearity on another, so plans use the project's one counter, not a second formula.

`greedy_plan` removes, until the target is met, whichever next unit (or block) costs the least importance per
unit of cost saved; `uniform_plan` keeps the same fraction of every layer (the only plan possible without values,
e.g. on the meta device).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sana_sr.pruning.dit_structure import KINDS, BlockWidths

from .importance import Scores

STRUCTURES = ("heads", "cross_heads", "channels", "depth")
METRICS = ("params", "macs")


@dataclass(frozen=True)
class Cost:
    params: float
    macs: float

    def get(self, metric: str) -> float:
        return self.params if metric == "params" else self.macs

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)

    def scale(self, k: float) -> Cost:
        return Cost(self.params * k, self.macs * k)


@dataclass
class CostModel:
    """Params and MACs of a SANA DiT as an affine function of its per-block widths (at one input size)."""

    fixed: Cost
    """Everything outside the blocks (patch/time/caption embeddings, output layer)."""
    block: Cost
    """One block at zero width (modulation table, output biases)."""
    unit: dict[str, Cost]
    """kind -> the cost of one head / cross-attention head / GLU channel."""

    def total(self, widths: Sequence[BlockWidths]) -> Cost:
        cost = self.fixed
        for w in widths:
            cost = cost + self.block_cost(w)
        return cost

    def block_cost(self, w: BlockWidths) -> Cost:
        cost = self.block
        for kind, c in self.unit.items():
            cost = cost + c.scale(w.get(kind))
        return cost

    @classmethod
    def measure(cls, build: Callable[[list[BlockWidths]], torch.nn.Module],
                count: Callable[[torch.nn.Module], tuple[int, int]], reference: BlockWidths) -> CostModel:
        """Coefficients from `count(build(widths))` (params, MACs) on 0- and 1-block models; checked at `reference`."""
        def cost(widths: list[BlockWidths]) -> Cost:
            return Cost(*(float(v) for v in count(build(widths))))

        fixed = cost([])
        kinds = [k for k in KINDS if reference.get(k) > 0]
        base = BlockWidths(1, 1 if "cross_heads" in kinds else 0, 1)
        one = cost([base])
        unit = {}
        for kind in kinds:
            more = BlockWidths(**{**base.as_dict(), kind: base.get(kind) + 1})
            d = cost([more])
            unit[kind] = Cost(d.params - one.params, d.macs - one.macs)
        block = Cost(one.params - fixed.params, one.macs - fixed.macs)
        for kind in kinds:
            block = Cost(block.params - unit[kind].params * base.get(kind), block.macs - unit[kind].macs * base.get(kind))
        model = cls(fixed, block, unit)
        predicted, measured = model.total([reference]), cost([reference])
        if abs(predicted.params - measured.params) > 0.5 or abs(predicted.macs - measured.macs) > 0.5:
            raise RuntimeError(f"the DiT's cost is not affine in its widths: predicted {predicted}, counted {measured} "
                               f"at {reference}; the plan cannot rely on it")
        return model


@dataclass
class PruningPlan:
    """Which blocks, heads and channels survive (indices into the model the plan was made for)."""

    kept_blocks: list[int]
    """Blocks kept, in order."""
    keep: dict[tuple[int, str], list[int]]
    """(block, kind) -> kept unit indices (sorted), for every kept block and prunable kind."""
    notes: dict = field(default_factory=dict)
    """How the plan was made (target, predicted cost, ...), for the report."""

    def widths(self) -> list[BlockWidths]:
        out = []
        for b in self.kept_blocks:
            out.append(BlockWidths(**{k: len(self.keep.get((b, k), [])) for k in KINDS}))
        return out

    def to_json(self) -> dict:
        return {"kept_blocks": self.kept_blocks, "notes": self.notes,
                "keep": {f"{b}/{k}": v for (b, k), v in sorted(self.keep.items())}}


def _check(target: float, metric: str, structures: Sequence[str]) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    bad = [s for s in structures if s not in STRUCTURES]
    if bad or not structures:
        raise ValueError(f"structures must be a non-empty subset of {STRUCTURES}, got {list(structures)}")
    if not target > 0:
        raise ValueError(f"the target must be positive, got {target}")


def _minimum(kind: str, units: int, min_heads: int, channel_multiple: int, min_keep_fraction: float) -> int:
    floor = math.ceil(min_keep_fraction * units - 1e-9)
    if kind == "channels":
        return min(units, max(channel_multiple, -(-floor // channel_multiple) * channel_multiple))
    return min(units, max(min_heads, floor))


def greedy_plan(scores: Scores, widths: Sequence[BlockWidths], costs: CostModel, target: float,
                metric: str = "params", structures: Sequence[str] = ("heads", "cross_heads", "channels"),
                min_heads: int = 1, channel_multiple: int = 1, min_keep_fraction: float = 0.0) -> PruningPlan:
    """Remove the least important unit per unit of cost saved until `costs.total <= target`, then add back the
    most recently removed units that still fit (so the result lands just under the target, not a head below it).

    Channels go in chunks of `channel_multiple` (each layer keeps a multiple of it); a layer keeps at least
    `min_heads` heads / `channel_multiple` channels and `min_keep_fraction` of its units (a global ranking can
    otherwise empty a layer almost completely); at least one block stays.
    """
    if not 0 <= min_keep_fraction <= 1:
        raise ValueError(f"min_keep_fraction must be in [0, 1], got {min_keep_fraction}")
    _check(target, metric, structures)
    n_blocks = len(widths)
    alive = [True] * n_blocks
    count = {(b, k): widths[b].get(k) for b in range(n_blocks) for k in KINDS if widths[b].get(k) > 0}
    order = {key: torch.argsort(scores.units[key], stable=True).tolist() for key in count}  # least important first
    removed = {key: 0 for key in count}  # units of order[key] removed so far
    chunks: dict[tuple[int, str], list[int]] = {key: [] for key in count}  # sizes of removed chunks, in order
    current = costs.total(widths).get(metric)

    def next_chunk(key):
        b, kind = key
        if kind not in structures or not alive[b]:
            return None
        left = count[key] - removed[key]
        m = channel_multiple if kind == "channels" else 1
        size = left % m or m
        if left - size < _minimum(kind, count[key], min_heads, channel_multiple, min_keep_fraction):
            return None
        idx = order[key][removed[key]: removed[key] + size]
        score = float(scores.units[key][idx].sum())
        return score / (costs.unit[kind].get(metric) * size), size

    heap = []
    for key in count:
        nxt = next_chunk(key)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], key, removed[key], nxt[1]))

    def block_cost(b):
        return costs.block_cost(BlockWidths(**{k: count.get((b, k), 0) - removed.get((b, k), 0) for k in KINDS}))

    log = []
    depth = "depth" in structures
    while current > target:
        best_block = None
        if depth and sum(alive) > 1:
            ratios = [(float(scores.blocks[b]) / block_cost(b).get(metric), b) for b in range(n_blocks) if alive[b]]
            best_block = min(ratios)
        while heap and (not alive[heap[0][1][0]] or heap[0][2] != removed[heap[0][1]]):
            heapq.heappop(heap)  # stale: its block is gone or the layer moved on
        if best_block is not None and (not heap or best_block[0] <= heap[0][0]):
            b = best_block[1]
            if heap and current - block_cost(b).get(metric) < target:
                depth = False  # a whole block would overshoot the target: finish with heads and channels
                continue
            current -= block_cost(b).get(metric)
            alive[b] = False
            log.append(("block", b))
            continue
        if not heap:
            break
        _, key, _, size = heapq.heappop(heap)
        removed[key] += size
        chunks[key].append(size)
        current -= costs.unit[key[1]].get(metric) * size
        log.append(("units", key))
        nxt = next_chunk(key)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], key, removed[key], nxt[1]))

    # Add back, newest first, removed chunks that fit under the target (a layer's newest chunk only).
    for what, key in reversed(log):
        if what != "units" or not alive[key[0]] or not chunks[key]:
            continue
        size = chunks[key][-1]
        extra = costs.unit[key[1]].get(metric) * size
        if current + extra <= target:
            chunks[key].pop()
            removed[key] -= size
            current += extra

    kept_blocks = [b for b in range(n_blocks) if alive[b]]
    keep = {key: sorted(order[key][removed[key]:]) for key in count if alive[key[0]]}
    plan = PruningPlan(kept_blocks, keep)
    plan.notes = {"plan": "greedy", "metric": metric, "target": target, "predicted": current,
                  "reached": current <= target, "structures": list(structures), "importance": scores.method,
                  "min_keep_fraction": min_keep_fraction}
    return plan


def _uniform_counts(widths, r, structures, min_heads, channel_multiple, channels=None, block_order=None):
    n = len(widths)
    kept = list(range(n))
    if "depth" in structures:
        k = max(1, min(n, round(r * n)))
        if block_order is not None:
            kept = sorted(block_order[:k])
        else:
            kept = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n // 2]
    out = {}
    for b in kept:
        for kind in KINDS:
            total = widths[b].get(kind)
            if total == 0:
                continue
            if kind not in structures:
                out[(b, kind)] = total
            elif kind == "channels":
                m = channel_multiple
                c = channels if channels is not None else r * total
                out[(b, kind)] = max(min(total, m), min(total, int(round(c / m)) * m))
            else:
                out[(b, kind)] = max(min(total, min_heads), min(total, round(r * total)))
    return kept, out


def uniform_plan(widths: Sequence[BlockWidths], costs: CostModel, target: float, metric: str = "params",
                 structures: Sequence[str] = ("heads", "cross_heads", "channels"), min_heads: int = 1,
                 channel_multiple: int = 1, scores: Scores | None = None) -> PruningPlan:
    """Keep the same fraction r of every pruned structure, r the largest meeting the target; then one common
    channel count is raised as far as the target allows. Units kept: the best by `scores`, or the first ones
    (a structural plan, for models without values); blocks kept: evenly spaced, or the best by `scores`."""
    _check(target, metric, structures)

    def total(kept, counts):
        return costs.total([BlockWidths(**{k: counts.get((b, k), 0) for k in KINDS}) for b in kept]).get(metric)

    order = torch.argsort(scores.blocks, descending=True, stable=True).tolist() if scores is not None else None

    def counts_at(r, channels=None):
        return _uniform_counts(widths, r, structures, min_heads, channel_multiple, channels, order)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(*counts_at(mid)) <= target else (lo, mid)
    kept, counts = counts_at(lo)
    if "channels" in structures:  # one common channel count, as high as the target allows
        c_lo, c_hi = 0, max(w.channels for w in widths) // channel_multiple
        while c_lo < c_hi:
            mid = (c_lo + c_hi + 1) // 2
            c_lo, c_hi = (mid, c_hi) if total(*counts_at(lo, mid * channel_multiple)) <= target else (c_lo, mid - 1)
        kept, counts = counts_at(lo, c_lo * channel_multiple)
    keep = {}
    for (b, kind), k in counts.items():
        if scores is None:
            keep[(b, kind)] = list(range(k))
        else:
            keep[(b, kind)] = sorted(torch.argsort(scores.units[(b, kind)], descending=True, stable=True)[:k].tolist())
    plan = PruningPlan(kept, keep)
    predicted = total(kept, counts)
    plan.notes = {"plan": "uniform", "metric": metric, "target": target, "predicted": predicted,
                  "reached": predicted <= target, "keep_fraction": lo, "structures": list(structures),
                  "importance": scores.method if scores is not None else "none (structural)"}
    return plan

