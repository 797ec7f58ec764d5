"""What to keep: a cost model of a model in its per-block widths, and plans that meet a parameter or MAC target.

When every counted cost of a block is linear in its unit counts (for the SANA DiT: projections, the linear
attention's two products, the cross-attention's products with the text tokens, the 1x1 and depthwise convs),

    cost = fixed + sum over kept blocks of (block + sum over kinds of units[kind] * c[kind])

holds exactly; `CostModel.measure` reads the coefficients off a counter applied to a few tiny (meta-device) models
and checks the linearity on another, so plans use the caller's one counter, not a second formula.

`greedy_plan` removes, until the target is met, whichever next unit (or block) costs the least importance per
unit of cost saved; `uniform_plan` keeps the same fraction of every layer (the only plan possible without values,
e.g. on the meta device). Kinds come in two sorts: channel-like ones (many fine units, named in
`channel_multiples` with the multiple their layers keep) and head-like ones (few coarse units, every layer keeping
at least `min_units`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .importance import Scores
from .structure import DEPTH, Widths

METRICS = ("params", "macs")


@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-accumulates of one call."""

    params: float
    """Parameter count."""
    macs: float
    """MACs at the counter's input size."""

    def get(self, metric: str) -> float:
        return self.params if metric == "params" else self.macs

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)

    def scale(self, k: float) -> Cost:
        return Cost(self.params * k, self.macs * k)


@dataclass
class CostModel:
    """Params and MACs of a model as an affine function of its per-block widths (at one input size)."""

    fixed: Cost
    """Everything outside the blocks (patch/time/caption embeddings, output layer)."""
    block: Cost
    """One block at zero width (modulation table, output biases)."""
    unit: dict[str, Cost]
    """kind -> the cost of one unit (a head, a channel)."""

    def total(self, widths: Sequence[Widths]) -> Cost:
        cost = self.fixed
        for w in widths:
            cost = cost + self.block_cost(w)
        return cost

    def block_cost(self, w: Widths) -> Cost:
        cost = self.block
        for kind, c in self.unit.items():
            cost = cost + c.scale(w.get(kind))
        return cost

    @classmethod
    def measure(cls, build: Callable[[list[Widths]], torch.nn.Module],
                count: Callable[[torch.nn.Module], tuple[int, int]], reference: Widths) -> CostModel:
        """Coefficients from `count(build(widths))` (params, MACs) on 0- and 1-block models; checked at `reference`
        (a block's widths, every kind listed: the kinds it has 0 of are left out of the model)."""
        def cost(widths: list[Widths]) -> Cost:
            return Cost(*(float(v) for v in count(build(widths))))

        fixed = cost([])
        kinds = [k for k in reference if reference[k] > 0]
        base = Widths({k: 1 if k in kinds else 0 for k in reference})
        one = cost([base])
        unit = {}
        for kind in kinds:
            more = Widths({**base, kind: base[kind] + 1})
            d = cost([more])
            unit[kind] = Cost(d.params - one.params, d.macs - one.macs)
        block = Cost(one.params - fixed.params, one.macs - fixed.macs)
        for kind in kinds:
            block = Cost(block.params - unit[kind].params * base.get(kind), block.macs - unit[kind].macs * base.get(kind))
        model = cls(fixed, block, unit)
        predicted, measured = model.total([reference]), cost([reference])
        if abs(predicted.params - measured.params) > 0.5 or abs(predicted.macs - measured.macs) > 0.5:
            raise RuntimeError(f"the model's cost is not affine in its widths: predicted {predicted}, counted "
                               f"{measured} at {reference}; the plan cannot rely on it")
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
    kinds: tuple[str, ...] = ()
    """Every kind of the model, in order (a block lacking one gets 0 of it); empty: the kinds `keep` names."""

    def widths(self) -> list[Widths]:
        kinds = self.kinds or tuple(dict.fromkeys(k for _, k in self.keep))
        return [Widths({k: len(self.keep.get((b, k), [])) for k in kinds}) for b in self.kept_blocks]

    def to_json(self) -> dict:
        return {"kept_blocks": self.kept_blocks, "notes": self.notes,
                "keep": {f"{b}/{k}": v for (b, k), v in sorted(self.keep.items())}}


def _kinds(widths: Sequence[Widths]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for w in widths for k in w))


def _check(target: float, metric: str, structures: Sequence[str], kinds: Sequence[str]) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    allowed = (*kinds, DEPTH)
    bad = [s for s in structures if s not in allowed]
    if bad or not structures:
        raise ValueError(f"structures must be a non-empty subset of {allowed}, got {list(structures)}")
    if not target > 0:
        raise ValueError(f"the target must be positive, got {target}")


def _rule(kind: str, min_units: int, channel_multiples: Mapping[str, int]) -> tuple[int, int]:
    """(multiple, minimum) of a kind's layers: a channel-like kind keeps one chunk at least, a head-like one
    `min_units`."""
    m = channel_multiples.get(kind)
    return (m, m) if m is not None else (1, min_units)


def _minimum(units: int, multiple: int, minimum: int, min_keep_fraction: float) -> int:
    floor = math.ceil(min_keep_fraction * units - 1e-9)
    return min(units, max(minimum, -(-floor // multiple) * multiple))


def greedy_plan(scores: Scores, widths: Sequence[Widths], costs: CostModel, target: float,
                metric: str = "params", structures: Sequence[str] | None = None, min_units: int = 1,
                channel_multiples: Mapping[str, int] | None = None, min_keep_fraction: float = 0.0) -> PruningPlan:
    """Remove the least important unit per unit of cost saved until `costs.total <= target`, then add back the
    most recently removed units that still fit (so the result lands just under the target, not a head below it).

    `structures`: the kinds that may shrink, and "depth" (whole blocks); default every kind, no depth. A
    channel-like kind (named in `channel_multiples`) goes in chunks of its multiple and each layer keeps a multiple
    of it, at least one; a head-like kind keeps at least `min_units`; every layer keeps `min_keep_fraction` of its
    units (a global ranking can otherwise empty a layer almost completely); at least one block stays.
    """
    if not 0 <= min_keep_fraction <= 1:
        raise ValueError(f"min_keep_fraction must be in [0, 1], got {min_keep_fraction}")
    kinds = _kinds(widths)
    structures = tuple(kinds if structures is None else structures)
    channel_multiples = dict(channel_multiples or {})
    _check(target, metric, structures, kinds)
    n_blocks = len(widths)
    alive = [True] * n_blocks
    count = {(b, k): widths[b].get(k) for b in range(n_blocks) for k in kinds if widths[b].get(k) > 0}
    order = {key: torch.argsort(scores.units[key], stable=True).tolist() for key in count}  # least important first
    removed = {key: 0 for key in count}  # units of order[key] removed so far
    chunks: dict[tuple[int, str], list[int]] = {key: [] for key in count}  # sizes of removed chunks, in order
    current = costs.total(widths).get(metric)

    def next_chunk(key):
        b, kind = key
        if kind not in structures or not alive[b]:
            return None
        left = count[key] - removed[key]
        m, minimum = _rule(kind, min_units, channel_multiples)
        size = left % m or m
        if left - size < _minimum(count[key], m, minimum, min_keep_fraction):
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
        return costs.block_cost(Widths({k: count.get((b, k), 0) - removed.get((b, k), 0) for k in kinds}))

    log = []
    depth = DEPTH in structures
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
    plan = PruningPlan(kept_blocks, keep, kinds=kinds)
    plan.notes = {"plan": "greedy", "metric": metric, "target": target, "predicted": current,
                  "reached": current <= target, "structures": list(structures), "importance": scores.method,
                  "min_keep_fraction": min_keep_fraction}
    return plan


def _uniform_counts(widths: Sequence[Widths], kinds: Sequence[str], r: float, structures: Sequence[str],
                    min_units: int, channel_multiples: Mapping[str, int], common: Mapping[str, int],
                    block_order: list[int] | None) -> tuple[list[int], dict[tuple[int, str], int]]:
    """Kept blocks, and units kept per (block, kind), at fraction r; `common`: kind -> one count for every block."""
    n = len(widths)
    kept = list(range(n))
    if DEPTH in structures:
        k = max(1, min(n, round(r * n)))
        if block_order is not None:
            kept = sorted(block_order[:k])
        else:
            kept = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n // 2]
    out = {}
    for b in kept:
        for kind in kinds:
            total = widths[b].get(kind)
            if total == 0:
                continue
            if kind not in structures:
                out[(b, kind)] = total
                continue
            m, minimum = _rule(kind, min_units, channel_multiples)
            c = common.get(kind, r * total)
            out[(b, kind)] = max(min(total, minimum), min(total, int(round(c / m)) * m))
    return kept, out


def uniform_plan(widths: Sequence[Widths], costs: CostModel, target: float, metric: str = "params",
                 structures: Sequence[str] | None = None, min_units: int = 1,
                 channel_multiples: Mapping[str, int] | None = None, scores: Scores | None = None) -> PruningPlan:
    """Keep the same fraction r of every pruned structure, r the largest meeting the target; then each
    channel-like kind's one common count (across blocks) is raised as far as the target allows. Units kept: the
    best by `scores`, or the first ones (a structural plan, for models without values); blocks kept: evenly
    spaced, or the best by `scores`. `structures`, `min_units`, `channel_multiples`: as in `greedy_plan`."""
    kinds = _kinds(widths)
    structures = tuple(kinds if structures is None else structures)
    channel_multiples = dict(channel_multiples or {})
    _check(target, metric, structures, kinds)

    def total(kept, counts):
        return costs.total([Widths({k: counts.get((b, k), 0) for k in kinds}) for b in kept]).get(metric)

    order = torch.argsort(scores.blocks, descending=True, stable=True).tolist() if scores is not None else None

    def counts_at(r, common):
        return _uniform_counts(widths, kinds, r, structures, min_units, channel_multiples, common, order)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(*counts_at(mid, {})) <= target else (lo, mid)
    common: dict[str, int] = {}
    kept, counts = counts_at(lo, common)
    for kind in (k for k in kinds if k in channel_multiples and k in structures):
        m = channel_multiples[kind]
        c_lo, c_hi = 0, max(w.get(kind) for w in widths) // m
        while c_lo < c_hi:
            mid = (c_lo + c_hi + 1) // 2
            c_lo, c_hi = (mid, c_hi) if total(*counts_at(lo, {**common, kind: mid * m})) <= target else (c_lo, mid - 1)
        common[kind] = c_lo * m
        kept, counts = counts_at(lo, common)
    keep = {}
    for (b, kind), k in counts.items():
        if scores is None:
            keep[(b, kind)] = list(range(k))
        else:
            keep[(b, kind)] = sorted(torch.argsort(scores.units[(b, kind)], descending=True, stable=True)[:k].tolist())
    plan = PruningPlan(kept, keep, kinds=kinds)
    predicted = total(kept, counts)
    plan.notes = {"plan": "uniform", "metric": metric, "target": target, "predicted": predicted,
                  "reached": predicted <= target, "keep_fraction": lo, "structures": list(structures),
                  "importance": scores.method if scores is not None else "none (structural)"}
    return plan
