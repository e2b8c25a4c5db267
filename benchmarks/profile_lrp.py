"""Where does LRP spend its extra time? Three experiments (see benchmarks/README.md):

    python benchmarks/profile_lrp.py [--model vgg16-64] [--batch 8] [--runs 5]

A. Whole model: ops in the optimised HLO (convolutions, dots, fusions) and XLA's FLOP / byte estimates for
   jax.grad and each composite.
B. One VGG conv layer (relu -> 3x3 conv, 256 -> 256 channels, 16x16): forward, its VJP, and each LRP rule
   (in a whole model the layer's forward is shared with the model's, here it is not).
C. On that layer: two convolutions with different weights (x W and x W+, or two VJPs) against one
   convolution with the weights stacked along the output (2 x 256 channels): does batching the extra
   passes of z+, gamma and alpha-beta into one conv pay on this backend?
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlrp  # noqa: E402
from models import build  # noqa: E402
from run import LRP, _flops, _memory, make_fn  # noqa: E402

OPS = ("convolution", "dot", "fusion", "reduce-window", "select-and-scatter", "divide")


def hlo_ops(compiled) -> collections.Counter:
    """Count the instructions of each opcode in the optimised HLO (top level and inside fusions)."""
    return collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", compiled.as_text()))


def bench(f, *args, runs: int) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def whole_model(model: str, batch: int) -> None:
    apply, variables, x = build(model, batch)
    args = (variables, x, jnp.arange(batch, dtype=jnp.int32) % 10)
    print(f"\n## A. {model}, batch {batch}: optimised HLO\n")
    print("| method | " + " | ".join(OPS) + " | GFLOP | GB accessed | memory MB |")
    print("|---|" + "---:|" * (len(OPS) + 3))
    for method in ["forward", "jax.grad", *LRP]:
        c = jax.jit(make_fn(method, apply)).lower(*args).compile()
        ops = hlo_ops(c)
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = _memory(c)
        print(f"| {method} | " + " | ".join(str(ops[o]) for o in OPS) + f" | {_flops(c) / 1e9:.2f} | "
              f"{cost.get('bytes accessed', float('nan')) / 1e9:.2f} | "
              f"{'n/a' if mem is None else f'{mem / 2**20:.0f}'} |")


class ReluConv(nn.Module):
    features: int = 256

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, (3, 3))(nn.relu(x))


def stacked_vs_separate(batch: int, runs: int) -> None:
    conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "SAME",  # noqa: E731
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (batch, 16, 16, 256)))
    w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, 256, 256))
    s = jax.random.normal(jax.random.key(2), (batch, 16, 16, 256))
    two_fwd = jax.jit(lambda x, w: (conv(x, w), conv(x, jnp.maximum(w, 0))))
    one_fwd = jax.jit(lambda x, w: jnp.split(conv(x, jnp.concatenate([w, jnp.maximum(w, 0)], -1)), 2, -1))
    vjp = lambda w, s: jax.vjp(lambda a: conv(a, w), x)[1](s)[0]  # noqa: E731
    two_bwd = jax.jit(lambda w, s, t: vjp(w, s) + vjp(jnp.maximum(w, 0), t))
    one_bwd = jax.jit(lambda w, s, t: vjp(jnp.concatenate([w, jnp.maximum(w, 0)], -1),
                                          jnp.concatenate([s, t], -1)))
    np.testing.assert_allclose(two_bwd(w, s, -s), one_bwd(w, s, -s), rtol=1e-3, atol=1e-3)
    print(f"\n## C. two convs vs one stacked conv (same FLOPs), batch {batch}, ms\n")
    print("| | two convs | one stacked conv |\n|---|---:|---:|")
    print(f"| forward x W, x W+ | {bench(two_fwd, x, w, runs=runs):.2f} | {bench(one_fwd, x, w, runs=runs):.2f} |")
    print(f"| VJPs s W^T + t W+^T | {bench(two_bwd, w, s, -s, runs=runs):.2f} | "
          f"{bench(one_bwd, w, s, -s, runs=runs):.2f} |")


def one_layer(batch: int, runs: int) -> None:
    model = ReluConv()
    x = jax.random.normal(jax.random.key(0), (batch, 16, 16, 256))
    params = model.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(2), p.shape), params)
    r0 = jax.random.uniform(jax.random.key(3), (batch, 16, 16, 256))
    fwd = jax.jit(model.apply)
    vjp = jax.jit(lambda p, x, r: jax.vjp(lambda x: model.apply(p, x), x)[1](r)[0])
    print(f"\n## B. one layer: relu -> conv 3x3, 256 -> 256, 16x16, batch {batch} (median of {runs}, ms)\n")
    t_vjp = bench(vjp, params, x, r0, runs=runs)
    print("| method | ms | x VJP | convolutions in HLO |\n|---|---:|---:|---:|")
    print(f"| forward | {bench(fwd, params, x, runs=runs):.2f} | | "
          f"{hlo_ops(fwd.lower(params, x).compile())['convolution']} |")
    print(f"| VJP (the forward is dead code) | {t_vjp:.2f} | 1.00 | "
          f"{hlo_ops(vjp.lower(params, x, r0).compile())['convolution']} |")
    rules = {"epsilon": jlrp.rules.epsilon(0.25), "zplus": jlrp.rules.zplus(),
             "gamma(0.25)": jlrp.rules.gamma(0.25), "alpha2_beta1": jlrp.rules.alpha_beta(2.0, 1.0)}
    for name, rule in rules.items():
        explain = jlrp.lrp(model.apply, rule, argnums=1)
        f = jax.jit(lambda p, x, r, e=explain: e(p, x, relevance=r))
        t = bench(f, params, x, r0, runs=runs)
        convs = hlo_ops(f.lower(params, x, r0).compile())["convolution"]
        print(f"| jlrp {name} | {t:.2f} | {t / t_vjp:.2f} | {convs} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16-64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    whole_model(a.model, a.batch)
    one_layer(a.batch, a.runs)
    stacked_vs_separate(a.batch, a.runs)
    print(f"\nload average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
