"""compress.pruning on a small non-SANA network (tests/pruning_toy.py): the checked dependency groups, pruning =
masking for heads / channels / blocks, the re-homed model, importance, the cost model, plans, torch-pruning's
MetaPruner, and the distillation loss. The SANA DiT's own tests: test_pruning_sana_dit.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch.utils.flop_counter import FlopCounterMode

from compress import FeatureTap
from compress.pruning import (
    CostModel,
    DistillWeights,
    GroupSpec,
    PruningGraph,
    PruningPlan,
    Scores,
    Widths,
    apply_plan,
    distillation_loss,
    feature_pairs,
    greedy_plan,
    meta_pruner,
    score,
    uniform_plan,
)
from tests.compress_nets import one_thread  # noqa: F401 (autouse fixture)
from tests.pruning_toy import ToyNet, ToyStructure, toy_inputs, toy_net

TOY = ToyStructure()
BLOCKS = ["blocks.0", "blocks.1", "blocks.2"]


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def count(model) -> tuple[int, int]:
    """Params, and MACs of one call on the toy's example input (torch's FLOP counter, on the meta device)."""
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(2, model.tokens, model.in_dim, device="meta"))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def build(widths) -> ToyNet:
    with torch.device("meta"):
        return ToyNet(widths)


def test_widths_are_hashable_mappings():
    w = Widths(heads=2, channels=8)
    assert w == {"heads": 2, "channels": 8} and w == Widths({"channels": 8, "heads": 2})
    assert len({w, Widths(heads=2, channels=8)}) == 1 and w.heads == 2 and w.get("cross_heads") == 0
    assert copy.deepcopy(w) == w and w.as_dict() == {"heads": 2, "channels": 8}
    with pytest.raises(ValueError, match="unit counts"):
        Widths(heads=-1)


def _masked_reference(model, plan: PruningPlan):
    """The unpruned net with the removed heads' / channels' output columns zeroed and removed blocks skipped."""
    ref = copy.deepcopy(model)
    d = ref.head_dim
    with torch.no_grad():
        for b, block in enumerate(ref.blocks):
            for h in set(range(block.heads)) - set(plan.keep[(b, "heads")] if b in plan.kept_blocks else []):
                block.out.weight[:, h * d:(h + 1) * d] = 0
            for ch in set(range(block.up.out_features)) - set(plan.keep.get((b, "channels"), [])):
                block.down.weight[:, ch] = 0
    ref.blocks = torch.nn.ModuleList([ref.blocks[b] for b in plan.kept_blocks])
    return ref


def test_pruning_removes_exactly_what_masking_removes():
    model = toy_net()
    x = toy_inputs()
    plan = PruningPlan(kept_blocks=[0, 2], keep={(0, "heads"): [1, 3], (0, "channels"): list(range(0, 24, 3)),
                                                 (2, "heads"): [2], (2, "channels"): [4, 5, 23]})
    reference = run(_masked_reference(model, plan), x)
    pruned = apply_plan(TOY, model, plan)
    assert isinstance(pruned, ToyNet) and pruned is not model  # re-homed by the structure's rebuild
    assert TOY.widths(pruned) == plan.widths() == [Widths(heads=2, channels=8), Widths(heads=1, channels=3)]
    assert [b.heads for b in pruned.blocks] == [2, 1] and pruned.kept_blocks == [0, 2]
    torch.testing.assert_close(run(pruned, x), reference, rtol=1e-5, atol=1e-5)


def test_a_group_with_unexpected_or_missing_layers_is_refused():
    class MissingValue(ToyStructure):
        def layers(self, model, block):
            heads, channels = super().layers(model, block)
            return [GroupSpec("heads", heads.unit_size, heads.root, heads.members[:2] + heads.members[3:]), channels]

    class ExtraLayer(ToyStructure):
        def layers(self, model, block):
            heads, channels = super().layers(model, block)
            return [heads, GroupSpec("channels", 1, block.up, channels.members + ((block.q, False),))]

    with pytest.raises(RuntimeError, match=r"block 0 heads: .*unexpected layers \['blocks.0.v'\]"):
        PruningGraph(MissingValue(), toy_net())
    with pytest.raises(RuntimeError, match="block 0 channels: .*misses 1 of 3; refusing to prune"):
        PruningGraph(ExtraLayer(), toy_net())


def test_cuts_keep_one_unit_and_hooks_run_in_order():
    calls = []

    class Logged(ToyStructure):
        def check(self, model):
            calls.append("check")

        def prepare(self, model):
            calls.append("prepare")

        def finish(self, model):
            calls.append("finish")

    graph = PruningGraph(TOY, toy_net())
    with pytest.raises(ValueError, match=r"block 1 heads: cannot remove units \[0, 1, 2, 3\].* of 4"):
        graph.prune(graph.layer(1, "heads"), range(4))
    score(Logged(), toy_net(), "magnitude")
    assert calls == ["check", "prepare", "finish"]


def test_magnitude_scores_follow_the_weights():
    model = toy_net()
    with torch.no_grad():
        model.blocks[1].v.weight[4:8] *= 10  # head 1 of block 1
        model.blocks[2].down.weight[:, 7] *= 10  # channel 7 of block 2
    scores = score(TOY, model, "magnitude")
    assert int(scores.units[(1, "heads")].argmax()) == 1
    assert int(scores.units[(2, "channels")].argmax()) == 7
    assert torch.allclose(scores.blocks, torch.stack([sum(scores.units[(b, k)].sum() for k in TOY.kinds)
                                                      for b in range(3)]))


def test_taylor_scores_every_unit_and_block():
    model = toy_net()
    x = toy_inputs()
    target = torch.randn_like(run(model, x))
    model.requires_grad_(False)
    scores = score(TOY, model, "taylor", lambda m, t: ((m(x) - t) ** 2).mean(), [target, target * 0.5])
    assert scores.batches == 2 and len(scores.losses) == 2
    assert all(v.shape[0] == TOY.widths(model)[b][k] for (b, k), v in scores.units.items())
    assert all(bool((v > 0).all()) for v in scores.units.values()) and bool((scores.blocks > 0).all())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="needs a loss function"):
        score(TOY, model, "taylor")


def test_cost_model_is_exact_against_the_counter():
    model = toy_net()
    costs = CostModel.measure(build, count, TOY.widths(model)[0])
    widths = [Widths(heads=3, channels=7), Widths(heads=1, channels=24), Widths(heads=4, channels=1)]
    predicted = costs.total(widths)
    assert (predicted.params, predicted.macs) == count(build(widths))
    assert costs.total(TOY.widths(model)).params == sum(p.numel() for p in model.parameters())


def _fake_scores(widths, seed=0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    units = {(b, k): torch.rand(w[k], generator=g, dtype=torch.float64) for b, w in enumerate(widths) for k in w}
    return Scores(units, torch.rand(len(widths), generator=g, dtype=torch.float64), "fake")


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_greedy_plan_lands_just_under_the_target_and_prunes_to_it(metric):
    model = toy_net()
    widths = TOY.widths(model)
    costs = CostModel.measure(build, count, widths[0])
    target = 0.5 * costs.total(widths).get(metric)
    plan = greedy_plan(_fake_scores(widths), widths, costs, target, metric=metric,
                       structures=("heads", "channels", "depth"), channel_multiples={"channels": 4})
    got = costs.total(plan.widths()).get(metric)
    assert target - costs.unit["heads"].get(metric) < got <= target  # within the toy's coarsest unit (~9%) under
    assert all(w.channels % 4 == 0 and w.heads >= 1 for w in plan.widths())
    pruned = apply_plan(TOY, model, plan)
    assert count(build(TOY.widths(pruned)))[1 if metric == "macs" else 0] == got
    with pytest.raises(ValueError, match=r"structures must be a non-empty subset of \('heads', 'channels', 'depth'\)"):
        greedy_plan(_fake_scores(widths), widths, costs, target, structures=("cross_heads",))


def test_uniform_plan_keeps_the_same_fraction_everywhere():
    model = toy_net()
    widths = TOY.widths(model)
    costs = CostModel.measure(build, count, widths[0])
    target = 0.6 * costs.total(widths).params
    plan = uniform_plan(widths, costs, target, channel_multiples={"channels": 1})
    assert len(set(plan.widths())) == 1 and plan.kept_blocks == [0, 1, 2]
    assert 0.95 * target <= costs.total(plan.widths()).params <= target
    assert plan.keep[(0, "heads")] == list(range(plan.widths()[0].heads))  # no scores: the first units
    depth = uniform_plan(widths, costs, 0.7 * costs.total(widths).params, structures=("depth",))
    assert depth.kept_blocks == [0, 2] and depth.widths() == widths[:2]  # evenly spaced


def test_metapruner_prunes_the_structures_layers_only():
    model = toy_net()
    pruner = meta_pruner(TOY, model, tp.importance.GroupMagnitudeImportance(), toy_inputs(), pruning_ratio=0.5,
                         head_pruning_ratio=0.5)
    pruner.step()
    TOY.after_cut(model)
    assert TOY.widths(model) == [Widths(heads=2, channels=12)] * 3
    assert model.stem.out_features == 16 and run(model, toy_inputs()).shape == (3, 5, 6)


def test_distillation_loss_terms_and_gradients():
    teacher = toy_net()
    student = apply_plan(TOY, copy.deepcopy(teacher), PruningPlan(
        kept_blocks=[0, 2], keep={(b, k): list(range(n)) for b in (0, 2) for k, n in (("heads", 2), ("channels", 8))}))
    x = toy_inputs()
    with FeatureTap(teacher, BLOCKS) as tf, torch.no_grad():
        t_out = teacher(x)
    with FeatureTap(student, BLOCKS[:2]) as sf:
        s_out = student(x)
    pairs = feature_pairs(student.kept_blocks)
    assert pairs == [(0, 0), (1, 2)]
    loss, parts = distillation_loss(s_out, t_out, sf.ordered(), tf.ordered(), pairs, DistillWeights(1.0, 0.5))
    assert loss.item() == pytest.approx(parts["distill_output"] + 0.5 * parts["distill_features"], rel=1e-5)
    loss.backward()
    assert student.head.weight.grad is not None and teacher.head.weight.grad is None
    same, _ = distillation_loss(t_out, t_out, tf.ordered(), tf.ordered(), feature_pairs(None, 3))
    assert same.item() == 0.0
