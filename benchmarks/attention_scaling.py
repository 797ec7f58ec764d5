"""Linear-attention scaling of the project's DiT against the same DiT with softmax self-attention (not a test).

    PYTHONPATH=. python benchmarks/attention_scaling.py [--layers 2] [--tokens 256 1024 4096 9216 16384] [--out r.json]

The DiT is `sana-0.6b`'s (width 1152, 36 heads of 32, 16 cross-attention heads, a 300-token prompt) with random
weights and `--layers` of its 28 blocks: time per token does not depend on the depth, and 28 blocks at 16k tokens
would take minutes per call on two cores. The softmax twin is the same module with diffusers' `AttnProcessor2_0`
(PyTorch's scaled_dot_product_attention, the memory-efficient CPU kernel) on every self-attention, the same
weights. Both run round-robin at every token count (same inputs, same threads), fp32, batch 1, after one warm-up
call each at the smallest count. Each is timed twice per count: a plain call (it projects the 300-token prompt:
the caption MLP, and keys and values in every block), and a call with the prompt's projections already made, as
every tile after an image's first runs (`sana_sr.model.prompt_reuse`, used by tiled restoration); the difference is
the prompt's cost, once per image. The last line: softmax over linear at 9216 tokens, and the spread of the linear
DiT's time per token around its median over all counts, with the prompt's projections made (what scales with the
image) and for a plain call.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg, machine_info  # noqa: E402

from sana_sr.model.prompt_reuse import reuse_prompt_projections  # noqa: E402


def build(layers: int):
    from diffusers import SanaTransformer2DModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sana_sr.model.presets import get_preset

    config = dict(get_preset("sana-0.6b").transformer, num_layers=layers)
    torch.manual_seed(0)
    linear = SanaTransformer2DModel(**config).eval()
    softmax = copy.deepcopy(linear)
    for block in softmax.transformer_blocks:
        block.attn1.set_processor(AttnProcessor2_0())
    return linear, softmax, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 9216, 16384],
                        help="token counts (perfect squares: the latent is side x side)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    load_before = loadavg()
    linear, softmax, config = build(args.layers)
    models = {"linear": linear, "softmax": softmax,
              "linear, prompt made": copy.deepcopy(linear), "softmax, prompt made": copy.deepcopy(softmax)}
    stack = contextlib.ExitStack()
    for name, model in models.items():
        if name.endswith("prompt made"):  # the warm-up call below makes the prompt's projections
            stack.enter_context(reuse_prompt_projections(model))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 300, config["caption_channels"], generator=g)
    mask = torch.ones(1, 300)
    timestep = torch.tensor([900.0])

    def call(model, tokens: int) -> None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise SystemExit(f"--tokens {tokens} is not a perfect square")
        latents = torch.randn(1, config["in_channels"], side, side, generator=torch.Generator().manual_seed(tokens))
        model(latents, encoder_hidden_states=prompt, timestep=timestep, encoder_attention_mask=mask)

    for model in models.values():
        call(model, args.tokens[0])
    times = {name: {n: [] for n in args.tokens} for name in models}
    for rep in range(args.reps):
        for tokens in args.tokens:
            for name, model in models.items():
                start = time.perf_counter()
                call(model, tokens)
                times[name][tokens].append(time.perf_counter() - start)
            print(f"rep {rep + 1}/{args.reps}, {tokens} tokens: "
                  + ", ".join(f"{name} {times[name][tokens][-1]:.2f} s" for name in models)
                  + f" (load {loadavg().split()[0]})", flush=True)  # fmt: skip
    stack.close()
    results = {}
    for name in models:
        results[name] = {str(n): {"median_s": statistics.median(ts), "s": [round(t, 3) for t in ts],
                                  "us_per_token": statistics.median(ts) / n * 1e6} for n, ts in times[name].items()}

    def spread_of(name: str) -> dict[str, float]:
        per_token = [results[name][str(n)]["us_per_token"] for n in args.tokens]
        middle = statistics.median(per_token)
        return {str(n): round(t / middle - 1, 4) for n, t in zip(args.tokens, per_token)}

    spread, plain_spread = spread_of("linear, prompt made"), spread_of("linear")
    prompt_s = {str(n): results["linear"][str(n)]["median_s"] - results["linear, prompt made"][str(n)]["median_s"]
                for n in args.tokens}  # fmt: skip
    # time = fixed + per_token·N (least squares over the linear DiT's counts, prompt projections made): the fixed part
    # is what else does not grow with the image (the timestep MLP, per-call overheads).
    xs, ys = args.tokens, [results["linear, prompt made"][str(n)]["median_s"] for n in args.tokens]
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / max(sum((x - mean_x) ** 2 for x in xs), 1e-12)
    fixed = mean_y - slope * mean_x
    marginal = {str(n): round(((y - fixed) / n) / slope - 1, 4) for n, y in zip(xs, ys)} if slope > 0 else {}
    ratio_at = 9216 if 9216 in args.tokens else args.tokens[-1]
    ratio = (results["softmax, prompt made"][str(ratio_at)]["median_s"]
             / results["linear, prompt made"][str(ratio_at)]["median_s"])  # fmt: skip
    report = {"benchmark": "attention scaling", "layers": args.layers, "width": config["num_attention_heads"] * 32,
              "threads": args.threads, "machine": machine_info(), "loadavg_before": load_before,
              "loadavg_after": loadavg(), "results": results, "linear_per_token_vs_median": spread,
              "linear_per_token_vs_median_plain_call": plain_spread, "linear_prompt_s": prompt_s,
              "linear_fit": {"fixed_s": fixed, "us_per_token": slope * 1e6,
                             "per_token_without_fixed_vs_slope": marginal},
              "softmax_over_linear": {str(n): results["softmax, prompt made"][str(n)]["median_s"]
                                      / results["linear, prompt made"][str(n)]["median_s"] for n in args.tokens}}
    print("linear and softmax DiT calls with the prompt's projections made; the plain call's time per token and the "
          "prompt's cost beside")  # fmt: skip
    print(f"{'tokens':>7} {'linear s':>9} {'us/token':>9} {'vs median':>10} {'softmax s':>10} {'softmax/linear':>15} "
          f"{'plain us/token':>15} {'vs median':>10} {'prompt s':>9}")  # fmt: skip
    for n in args.tokens:
        lin, soft = results["linear, prompt made"][str(n)], results["softmax, prompt made"][str(n)]
        plain = results["linear"][str(n)]
        print(f"{n:7d} {lin['median_s']:9.3f} {lin['us_per_token']:9.1f} {spread[str(n)]:+10.1%} "
              f"{soft['median_s']:10.3f} {soft['median_s'] / lin['median_s']:14.2f}x "
              f"{plain['us_per_token']:15.1f} {plain_spread[str(n)]:+10.1%} {prompt_s[str(n)]:9.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    worst = max(abs(v) for v in spread.values())
    print(f"load {load_before} -> {report['loadavg_after']}; fit: {fixed:.3f} s fixed + {slope * 1e6:.1f} us/token "
          f"(time per token less the fixed part within ±{max(map(abs, marginal.values()), default=0):.1%})")
    plain_worst = max(abs(v) for v in plain_spread.values())
    print(f"softmax/linear at {ratio_at} tokens: {ratio:.2f}x; linear time per token within ±{worst:.1%} of its "
          f"median over {args.tokens[0]}..{args.tokens[-1]} tokens with the prompt's projections made "
          f"(±{plain_worst:.1%} for a plain call, which also projects the prompt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
