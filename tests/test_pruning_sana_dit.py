"""compress.pruning on the real diffusers SanaTransformer2DModel through `SanaDiTStructure` (tiny config, random
weights): the exact value/gate split, torch-pruning's MetaPruner made to work, pruning = masking for heads /
channels / blocks, the cost model, plans, and the distillation loss. The package on a non-SANA model:
test_pruning_core.py."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch_pruning as tp
from diffusers import SanaTransformer2DModel

from compress import FeatureTap
from compress.pruning import (
    CostModel,
    DistillWeights,
    PruningPlan,
    Scores,
    apply_plan,
    distillation_loss,
    feature_pairs,
    greedy_plan,
    meta_pruner,
    score,
    uniform_plan,
)
from sana_sr.model.presets import get_preset
from sana_sr.pruning.dit_structure import (
    BlockWidths,
    block_names,
    example_inputs,
    forward_fn,
    merge_glu,
    model_widths,
    split_glu,
    sync_heads,
)
from sana_sr.pruning.model import PrunedSanaTransformer2DModel, skeleton
from sana_sr.pruning.structure import SanaDiTStructure

DIT = SanaDiTStructure()


def tiny_dit(seed: int = 0) -> SanaTransformer2DModel:
    torch.manual_seed(seed)
    return SanaTransformer2DModel(**get_preset("tiny").transformer).eval()


def inputs(model, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    x = example_inputs(model, batch=2, side=4, text_tokens=6)
    x["encoder_attention_mask"][1, 4:] = 0  # a padded prompt: the mask path of the cross-attention runs too
    return x


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return forward_fn(model, x)


def count(model) -> tuple[int, int]:
    """Params, and MACs by the project's counter (sana_sr.model.cost) at 8x8 latents and 6 text tokens."""
    from sana_sr.model.cost import dit_cost

    c = dit_cost(model, (8, 8), 6)
    return c.params, c.macs


def test_value_gate_split_is_exact_and_merges_back():
    model = tiny_dit()
    x = inputs(model)
    reference = run(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    split_glu(model)
    assert torch.equal(run(model, x), reference)  # bit-identical, not merely close
    merge_glu(model)
    assert torch.equal(run(model, x), reference)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_stock_metapruner_fails_and_the_prepared_model_prunes():
    model = tiny_dit()
    x = inputs(model)
    with pytest.raises(IndexError), warnings.catch_warnings():  # the failure the issue describes
        warnings.simplefilter("ignore", UserWarning)
        tp.pruner.MetaPruner(copy.deepcopy(model), x, tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
                             forward_fn=forward_fn).step()
    split_glu(model)
    pruner = meta_pruner(DIT, model, tp.importance.GroupMagnitudeImportance(), x, pruning_ratio=0.5,
                         head_pruning_ratio=0.5)
    pruner.step()
    sync_heads(model)
    merge_glu(model)
    assert model_widths(model) == [BlockWidths(2, 1, 80)] * 4
    assert run(model, x).shape == x["hidden_states"].shape


def _masked_reference(model, plan: PruningPlan):
    """The unpruned model with the removed heads' / channels' output columns zeroed and removed blocks skipped."""
    ref = copy.deepcopy(model)
    cfg = ref.config
    for b, block in enumerate(ref.transformer_blocks):
        with torch.no_grad():
            for kind, attn, d in (("heads", block.attn1, cfg.attention_head_dim),
                                  ("cross_heads", block.attn2, cfg.cross_attention_head_dim)):
                for h in set(range(attn.heads)) - set(plan.keep.get((b, kind), range(attn.heads))):
                    attn.to_out[0].weight[:, h * d:(h + 1) * d] = 0
            c = block.ff.conv_point.in_channels
            for ch in set(range(c)) - set(plan.keep.get((b, "channels"), range(c))):
                block.ff.conv_point.weight[:, ch] = 0
    ref.transformer_blocks = torch.nn.ModuleList([ref.transformer_blocks[b] for b in plan.kept_blocks])
    return ref


def test_pruning_removes_exactly_what_masking_removes():
    model = tiny_dit()
    x = inputs(model)
    plan = PruningPlan(kept_blocks=[0, 2, 3], keep={})
    for b in plan.kept_blocks:
        plan.keep[(b, "heads")] = [0, 2] if b != 3 else [1]
        plan.keep[(b, "cross_heads")] = [1] if b == 0 else [0, 1]
        plan.keep[(b, "channels")] = list(range(b, 160, 3))
    reference = run(_masked_reference(model, plan), x)
    pruned = apply_plan(DIT, model, plan)
    assert isinstance(pruned, PrunedSanaTransformer2DModel)
    assert pruned.widths == plan.widths() == [BlockWidths(2, 1, 54), BlockWidths(2, 2, 53), BlockWidths(1, 2, 53)]
    assert [b.attn1.heads for b in pruned.transformer_blocks] == [2, 2, 1]
    assert [b.attn2.heads for b in pruned.transformer_blocks] == [1, 2, 2]
    assert list(pruned.config.kept_blocks) == [0, 2, 3]
    torch.testing.assert_close(run(pruned, x), reference, rtol=1e-5, atol=1e-5)


def test_the_subclass_takes_every_argument_of_diffusers_sana_dit():
    base = set(inspect.signature(SanaTransformer2DModel.__init__).parameters)
    ours = set(inspect.signature(PrunedSanaTransformer2DModel.__init__).parameters)
    assert base <= ours, f"diffusers added {sorted(base - ours)}: add them to PrunedSanaTransformer2DModel"


def test_cost_model_is_exact_against_the_counter():
    model = tiny_dit()
    costs = CostModel.measure(lambda w: skeleton(model.config, w), count, model_widths(model)[0])
    widths = [BlockWidths(3, 1, 37), BlockWidths(1, 2, 160), BlockWidths(4, 2, 5)]
    predicted = costs.total(widths)
    params, macs = count(skeleton(model.config, widths))
    assert (predicted.params, predicted.macs) == (params, macs)
    assert costs.total(model_widths(model)).params == sum(p.numel() for p in model.parameters())


def _fake_scores(widths, seed=0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    units = {(b, k): torch.rand(w.get(k), generator=g, dtype=torch.float64)
             for b, w in enumerate(widths) for k in ("heads", "cross_heads", "channels")}
    return Scores(units, torch.rand(len(widths), generator=g, dtype=torch.float64), "fake")


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_greedy_plan_lands_just_under_the_target(metric):
    model = tiny_dit()
    widths = model_widths(model)
    costs = CostModel.measure(lambda w: skeleton(model.config, w), count, widths[0])
    target = 0.5 * costs.total(widths).get(metric)
    plan = greedy_plan(_fake_scores(widths), widths, costs, target, metric=metric,
                       structures=("heads", "cross_heads", "channels", "depth"), channel_multiples={"channels": 4})
    got = costs.total(plan.widths()).get(metric)
    assert 0.98 * target <= got <= target
    assert all(w.channels % 4 == 0 and w.heads >= 1 and w.cross_heads >= 1 for w in plan.widths())


def test_uniform_plan_keeps_the_same_fraction_everywhere():
    model = tiny_dit()
    widths = model_widths(model)
    costs = CostModel.measure(lambda w: skeleton(model.config, w), count, widths[0])
    target = 0.6 * costs.total(widths).params
    plan = uniform_plan(widths, costs, target, channel_multiples={"channels": 1})
    assert len(set(plan.widths())) == 1 and plan.kept_blocks == [0, 1, 2, 3]
    assert 0.98 * target <= costs.total(plan.widths()).params <= target
    assert plan.keep[(0, "heads")] == list(range(plan.widths()[0].heads))  # no scores: the first units


def test_magnitude_scores_follow_the_weights():
    model = tiny_dit()
    with torch.no_grad():
        model.transformer_blocks[1].attn1.to_v.weight[16:32] *= 10  # head 1 of block 1
        model.transformer_blocks[2].ff.conv_point.weight[:, 7] *= 10  # channel 7 of block 2
    scores = score(DIT, model, "magnitude")
    assert int(scores.units[(1, "heads")].argmax()) == 1
    assert int(scores.units[(2, "channels")].argmax()) == 7
    assert isinstance(model.transformer_blocks[0].ff, type(tiny_dit().transformer_blocks[0].ff))  # merged back


@pytest.mark.slow
def test_taylor_scores_every_unit_and_block():
    model = tiny_dit()
    x = inputs(model)
    target = torch.randn_like(run(model, x))
    scores = score(DIT, model, "taylor", lambda m, t: ((forward_fn(m, x) - t) ** 2).mean(), [target, target * 0.5])
    assert scores.batches == 2 and len(scores.losses) == 2
    assert all(v.shape[0] == n for (b, k), v in scores.units.items()
               for n in [model_widths(model)[b].get(k)])
    assert all(bool((v > 0).all()) for v in scores.units.values()) and bool((scores.blocks > 0).all())
    assert all(p.grad is None for p in model.parameters())


def test_distillation_loss_terms_and_gradients():
    teacher = tiny_dit()
    student = apply_plan(DIT, copy.deepcopy(teacher), PruningPlan(
        kept_blocks=[0, 2], keep={(b, k): list(range(n)) for b in (0, 2)
                                  for k, n in (("heads", 2), ("cross_heads", 1), ("channels", 40))}))
    x = inputs(teacher)
    with FeatureTap(teacher, block_names(teacher)) as tf, torch.no_grad():
        t_out = forward_fn(teacher, x)
    with FeatureTap(student, block_names(student)) as sf:
        s_out = forward_fn(student, x)
    assert len(tf.ordered()) == 4 and len(sf.ordered()) == 2
    pairs = feature_pairs(student.config.kept_blocks)
    assert pairs == [(0, 0), (1, 2)]
    loss, parts = distillation_loss(s_out, t_out, sf.ordered(), tf.ordered(), pairs, DistillWeights(1.0, 0.5))
    assert loss.item() == pytest.approx(parts["distill_output"] + 0.5 * parts["distill_features"], rel=1e-5)
    loss.backward()
    assert student.proj_out.weight.grad is not None and teacher.proj_out.weight.grad is None
    same, _ = distillation_loss(t_out, t_out, tf.ordered(), tf.ordered(), feature_pairs(None, 4))
    assert same.item() == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(s_out, t_out[:1], sf.ordered(), tf.ordered(), pairs)
