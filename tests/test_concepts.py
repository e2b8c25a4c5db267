"""Concept Relevance Propagation (jlrp.concepts) against independent float64 references.

The references never use the interpreter's gates: a hand-written numpy epsilon-LRP of a small conv net with the
relevance masked where a condition says, and (for composites without a numpy reference) the report's relevance
at a layer, masked, propagated through a separately explained sub-network.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlrp
from jlrp import concepts
from jlrp._src.concepts import _box

EPS = 0.01
DN = ("NHWC", "HWIO", "NHWC")


def lower(p, x):
    """conv - relu - conv: up to the output of layer c2 (the concept layer of most tests)."""
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"]["w"], (1, 1), "SAME", dimension_numbers=DN)
                    + p["c1"]["b"])
    return jax.lax.conv_general_dilated(h, p["c2"]["w"], (1, 1), "SAME", dimension_numbers=DN) + p["c2"]["b"]


def model(p, x):
    h = jax.nn.relu(lower(p, x))
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p["d1"]["w"] + p["d1"]["b"])
    return h @ p["d2"]["w"] + p["d2"]["b"]


@pytest.fixture(scope="module")
def net():
    rng = np.random.default_rng(0)  # numpy draws: no eager JAX programs to compile
    n = lambda *s, scale: jnp.asarray(scale * rng.standard_normal(s))  # noqa: E731
    p = {"c1": {"w": n(3, 3, 2, 4, scale=0.5), "b": n(4, scale=0.1)},
         "c2": {"w": n(3, 3, 4, 5, scale=0.4), "b": n(5, scale=0.1)},
         "d1": {"w": n(6 * 6 * 5, 7, scale=0.15), "b": n(7, scale=0.1)},
         "d2": {"w": n(7, 3, scale=0.5), "b": n(3, scale=0.1)}}
    return p, jnp.asarray(rng.uniform(size=(2, 6, 6, 2)))


# -- the numpy reference: epsilon-LRP written out, relevance masked at the named layers' outputs -------------

def _patches(x):  # (N, H, W, 9, C): the 3x3 neighbourhoods of a SAME convolution
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], 3)


def _stab(z):
    return z + EPS * np.where(z >= 0, 1.0, -1.0)


def _conv(x, w, b):
    return np.einsum("nhwkc,kco->nhwo", _patches(x), w.reshape(9, *w.shape[2:])) + b


def _conv_lrp(x, w, b, r):
    s = r / _stab(_conv(x, w, b))
    g = np.einsum("nhwo,kco->nhwkc", s, w.reshape(9, *w.shape[2:]))
    h, wd = x.shape[1:3]
    gx = np.zeros((x.shape[0], h + 2, wd + 2, x.shape[3]))
    for k in range(9):
        i, j = divmod(k, 3)
        gx[:, i:i + h, j:j + wd] += g[:, :, :, k]
    return x * gx[:, 1:-1, 1:-1]


def _dense_lrp(x, w, b, r):
    return x * ((r / _stab(x @ w + b)) @ w.T)


def reference(p, x, target, masks=None):
    """Input relevance and relevance at the outputs of c1, c2 and d1, masked by ``masks[name]`` there."""
    p = jax.tree.map(np.asarray, p)
    x, masks = np.asarray(x), masks or {}
    a1 = np.maximum(_conv(x, p["c1"]["w"], p["c1"]["b"]), 0)
    a2 = np.maximum(_conv(a1, p["c2"]["w"], p["c2"]["b"]), 0)
    f = a2.reshape(len(x), -1)
    a3 = np.maximum(f @ p["d1"]["w"] + p["d1"]["b"], 0)
    out = a3 @ p["d2"]["w"] + p["d2"]["b"]
    r = {"d1": _dense_lrp(a3, p["d2"]["w"], p["d2"]["b"], out * np.eye(3)[target])}  # ReLUs pass relevance
    r["d1"] = r["d1"] * masks.get("d1", 1.0)
    r["c2"] = _dense_lrp(f, p["d1"]["w"], p["d1"]["b"], r["d1"]).reshape(a2.shape) * masks.get("c2", 1.0)
    r["c1"] = _conv_lrp(a1, p["c2"]["w"], p["c2"]["b"], r["c2"]) * masks.get("c1", 1.0)
    return _conv_lrp(x, p["c1"]["w"], p["c1"]["b"], r["c1"]), r


C1, C2, D1 = jlrp.param_path("c1/*"), jlrp.param_path("c2/*"), jlrp.param_path("d1/*")
TARGET = np.array([2, 0])


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10 * np.abs(b).max())


@pytest.fixture(scope="module")
def cond():
    return concepts.conditional(model, jlrp.rules.epsilon(EPS), argnums=1, chunk_size=2)


def jit(f, *args):
    """Run ``f`` jitted: one compiled program instead of hundreds of eagerly compiled small ones."""
    return jax.jit(f)(*args)


def test_channel_conditions_equal_lrp_masked_at_the_layer(net, cond):
    p, x = net
    got = cond(p, x, target=TARGET, conditions={C2: "all"})  # 5 channels in chunks of 2
    assert got.shape == (5,) + x.shape
    for c in range(5):
        close(got[c], reference(p, x, TARGET, {"c2": np.eye(5)[c]})[0])
    unconditional = reference(p, x, TARGET)[0]
    assert not np.allclose(got[0], unconditional)  # a condition changes the heatmap
    close(got.sum(0), unconditional)  # the channels of a layer partition its relevance


def test_conditions_at_several_layers_compose(net, cond):
    p, x = net
    paired, one = jit(lambda p, x: (cond(p, x, target=TARGET, conditions={C2: [0, 1, 4], D1: [3, 3, 6]}),
                                    cond(p, x, target=TARGET, conditions={C1: [2], C2: [0, 1]})), p, x)
    for k, (c, u) in enumerate([(0, 3), (1, 3), (4, 6)]):  # paired one to one
        close(paired[k], reference(p, x, TARGET, {"c2": np.eye(5)[c], "d1": np.eye(7)[u]})[0])
    close(one[1], reference(p, x, TARGET, {"c1": np.eye(4)[2], "c2": np.eye(5)[1]})[0])  # one with each


def test_user_masks_regions_and_channel_weights(net, cond):
    p, x = net
    region = np.zeros((2, 1, 6, 6, 1))
    region[0, :, :3, :3], region[1, :, 2:, 1:4] = 1.0, 1.0
    weights = np.array([[0.5, -1.0, 0.0, 2.0, 0.25]])  # a direction: soft weights of the channels
    regions, weighted = jit(lambda p, x: (cond(p, x, target=TARGET, conditions={C2: region}),
                                          cond(p, x, target=TARGET, conditions={C2: weights})), p, x)
    for k in range(2):
        close(regions[k], reference(p, x, TARGET, {"c2": region[k]})[0])
    close(weighted[0], reference(p, x, TARGET, {"c2": weights[0]})[0])


def test_concept_relevance_and_the_attribution_graph(net, cond):
    p, x = net
    _, r = reference(p, x, TARGET)
    report = jlrp.report(model, jlrp.rules.epsilon(EPS), argnums=1)
    per, (values, ids), graph, total = jit(lambda p, x: (
        cond.concept_relevance(p, x, layer=C2, target=TARGET), cond.top_concepts(p, x, layer=C2, k=3, target=TARGET),
        cond.attribution_graph(p, x, upper=C2, lower=C1, target=TARGET),  # (5 upper, N, 4 lower)
        report(p, x, target=TARGET).layers[cond.layer(p, x, layer=C2).index].total), p, x)
    close(per, r["c2"].sum((1, 2)))
    close(per.sum(), total)  # the concepts of a layer sum to the layer's total
    np.testing.assert_array_equal(ids, np.argsort(-r["c2"].sum((1, 2)), 1)[:, :3])
    close(values, np.take_along_axis(per, ids, 1))
    for j in range(5):
        close(graph[j], reference(p, x, TARGET, {"c2": np.eye(5)[j]})[1]["c1"].sum((1, 2)))
    close(graph.sum(0), r["c1"].sum((1, 2)))


def test_other_composites_match_a_separately_explained_subnetwork(net):
    """Conditioning on channel c == the report's relevance at c2, masked to c, propagated by LRP of the
    sub-network x -> c2 (no gates involved), here with flat, z+ and epsilon rules."""
    p, x = net
    composite = jlrp.composites.epsilon_plus_flat()
    cond = concepts.conditional(model, composite, argnums=1)
    index = cond.layer(p, x, layer=C2).index

    def both(p, x):
        at_c2 = jlrp.report(model, composite, argnums=1)(p, x, target=TARGET).layers[index].relevance
        want = jlrp.lrp(lower, composite, argnums=1)(p, x, relevance=at_c2 * np.eye(5)[3])
        return cond(p, x, target=TARGET, conditions={C2: 3})[0], want

    got, want = jit(both, p, x)
    close(got, want)


def test_vmap_chunks_and_jit_agree_with_one_call_per_condition(net, cond):
    """Called with arrays, a Conditional compiles its work and runs chunks from Python; inside the user's jit it
    is traced (chunks in lax.map). Both equal one call per condition."""
    p, x = net
    ids = [4, 0, 2]
    loop = np.stack([cond(p, x, target=TARGET, conditions={C2: c})[0] for c in ids])
    close(cond(p, x, target=TARGET, conditions={C2: ids}, chunk_size=2), loop)  # a chunk of 2, a padded one
    chunked, traced_ids = jit(lambda p, x, c: (cond(p, x, target=TARGET, conditions={C2: ids}, chunk_size=2),
                                               cond(p, x, target=TARGET, conditions={C2: c})), p, x, jnp.asarray(ids))
    close(chunked, loop)  # lax.map over chunks
    close(traced_ids, loop)  # all at once (vmap), ids unknown until the program runs
    # one compiled function for every call with these arguments (here and in the first test)
    assert sum(key[0] == "explain" and key[-1] == (cond.layer(p, x, layer=C2).index,) for key in cond._compiled) == 1


def test_errors_name_the_problem(net, cond):
    p, x = net
    explain = lambda **c: cond(p, x, target=TARGET, conditions=c["c"])  # noqa: E731
    with pytest.raises(ValueError, match=r"(?s)matches 2 layers.*#0 conv c1/b, c1/w"):
        explain(c={"conv": 0})
    with pytest.raises(ValueError, match="(?s)unknown layer selector 'c2'.*The layers a concept can live in"):
        explain(c={"c2": 0})
    with pytest.raises(ValueError, match="matches no layer"):
        explain(c={jlrp.module_path("nothing"): 0})
    with pytest.raises(ValueError, match="matches no layer"):
        explain(c={99: 0})
    with pytest.raises(ValueError, match=r"channel ids \[5\] out of range.*5 channels"):
        explain(c={C2: [5]})
    with pytest.raises(ValueError, match=r"masks of shape \(1, 4\).*broadcast to the layer's output \(2, 6, 6, 5\)"):
        explain(c={C2: np.ones((1, 4))})
    with pytest.raises(ValueError, match="leading concept axis"):
        explain(c={C2: np.float64(1.0)})
    with pytest.raises(ValueError, match=r"one to one.*\[2, 3\]"):
        explain(c={C1: [0, 1], C2: [0, 1, 2]})
    with pytest.raises(TypeError, match="non-empty dict"):
        explain(c={})
    with pytest.raises(ValueError, match="lower .* must come before upper"):
        cond.attribution_graph(p, x, upper=C1, lower=C2, target=TARGET)
    with pytest.raises(ValueError, match="k=6: the layer has 5 concepts"):
        cond.top_concepts(p, x, layer=C2, k=6, target=TARGET)


# -- relevance and activation maximisation ----------------------------------------------------------------

def _numpy_box(heat, mass):
    """Bounding box of the fewest pixels holding ``mass`` of the positive relevance (pixels summed over
    channels), the reference for the crops."""
    p = np.maximum(heat.sum(-1), 0)
    order = np.sort(p.ravel())[::-1]
    n = int(np.searchsorted(np.cumsum(order), mass * order.sum())) + 1
    rows, cols = np.nonzero(p >= order[min(n, order.size) - 1])
    return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1])


def test_box_holds_the_top_mass():
    heat = np.zeros((8, 9, 1))
    heat[2, 3], heat[5, 6], heat[7, 0] = 4.0, 3.0, 1.0
    heat[0, 0] = -9.0  # negative relevance never counts
    box = jax.jit(_box)
    np.testing.assert_array_equal(box(heat, 0.5), [2, 3, 3, 4])
    np.testing.assert_array_equal(box(heat, 0.8), [2, 3, 6, 7])
    np.testing.assert_array_equal(box(heat, 1.0), [2, 0, 8, 7])
    np.testing.assert_array_equal(box(np.zeros((8, 9, 1)), 0.5), [0, 0, 8, 9])  # nothing positive: all


@pytest.fixture(scope="module")
def data(net):
    p, _ = net
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(size=(13, 6, 6, 2)))
    y = rng.integers(0, 3, 13)
    return x, y


def _batches(x, y, size=5):  # 5 + 5 + 3: the last batch is padded to one compiled shape
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_relevance_maximization_keeps_the_top_k_and_their_heatmaps(net, data, cond, tmp_path):
    p, _ = net
    x, y = data
    refs = concepts.maximize(cond, _batches(x, y), p, layer=C2, k=3, concepts=[0, 2, 3], mass=0.7, progress=False)
    scores = np.stack([reference(p, x[i:i + 1], y[i:i + 1])[1]["c2"].sum((0, 1, 2)) for i in range(13)])  # (13, 5)
    for r, c in enumerate([0, 2, 3]):
        order = np.argsort(-scores[:, c])[:3]
        np.testing.assert_array_equal(refs.indices[r], order)
        close(refs.scores[r], scores[order, c])
        np.testing.assert_array_equal(refs.inputs[r], x[order])
        np.testing.assert_array_equal(refs.targets[r], y[order])
        for j, i in enumerate(order):
            heat, at = reference(p, x[i:i + 1], y[i:i + 1], {"c2": np.eye(5)[c]})
            close(refs.heatmaps[r, j], heat[0])
            neuron = np.zeros_like(at["c2"])  # the crop: the top mass of the most relevant neuron's heatmap
            neuron[np.unravel_index(np.argmax(at["c2"][..., c]), at["c2"].shape[:3]) + (c,)] = 1
            np.testing.assert_array_equal(refs.boxes[r, j], _numpy_box(reference(p, x[i:i + 1], y[i:i + 1],
                                                                                 {"c2": neuron})[0][0], 0.7))
    t, l, b, rt = refs.boxes[1, 0]
    np.testing.assert_array_equal(refs.crops(2)[0], x[refs.indices[1, 0], t:b, l:rt])
    refs.save(tmp_path / "refs.npz")
    back = concepts.load(tmp_path / "refs.npz")
    assert (back.layer, back.layer_name, back.mode, back.mass) == (refs.layer, refs.layer_name, "relevance", 0.7)
    for name in ("concepts", "scores", "indices", "inputs", "targets", "heatmaps", "boxes"):
        np.testing.assert_array_equal(getattr(back, name), getattr(refs, name))
    with pytest.raises(KeyError, match="concept 1 is not among"):
        refs.crops(1)


def test_activation_maximization_ranks_by_activation_and_seeds_at_the_layer(net, data, cond):
    p, _ = net
    x, y = data
    refs = concepts.maximize(cond, _batches(x, y, 4), p, layer=C2, mode="activation", k=2, progress=False)
    q, xs = jax.tree.map(np.asarray, p), np.asarray(x)
    a1 = np.maximum(_conv(xs, q["c1"]["w"], q["c1"]["b"]), 0)
    z2 = _conv(a1, q["c2"]["w"], q["c2"]["b"])  # (13, 6, 6, 5): the layer's output, computed without jlrp
    order = np.argsort(-z2.max((1, 2)), 0)[:2].T  # (5 concepts, 2)
    np.testing.assert_array_equal(refs.indices, order)
    close(refs.scores, np.take_along_axis(z2.max((1, 2)).T, order, 1))
    for c in range(5):  # relevance seeded at the layer with the concept's activation, propagated to the input
        seed = z2[order[c]] * np.eye(5)[c]
        close(refs.heatmaps[c], _conv_lrp(xs[order[c]], q["c1"]["w"], q["c1"]["b"],
                                          _conv_lrp(a1[order[c]], q["c2"]["w"], q["c2"]["b"], seed)))
    picture = concepts.atlas(cond, p, x[:1], references=refs, target=1, n_concepts=2, n_references=1, tile=12,
                             overlay=True)
    assert picture.dtype == np.uint8 and picture.ndim == 3
    with pytest.raises(ValueError, match="batch of one"):
        concepts.atlas(cond, p, x[:2], references=refs)


def test_maximize_errors(net, data, cond):
    p, _ = net
    x, y = data
    with pytest.raises(ValueError, match="keeps the top k=20 samples per concept but the batches held 13"):
        concepts.maximize(cond, _batches(x, y), p, layer=C2, k=20, progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        concepts.maximize(cond, _batches(x, y), p, layer=C2, mode="gradient", progress=False)
    with pytest.raises(ValueError, match=r"channel ids \[7\] out of range"):
        concepts.maximize(cond, _batches(x, y), p, layer=C2, concepts=[7], progress=False)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, jlrp
assert len(jax.local_devices()) == 2
rng = np.random.default_rng(0)
w1, w2 = np.abs(rng.standard_normal((6, 5))) + 0.1, rng.standard_normal((5, 3))  # no dead units: no ties
f = lambda p, x: jax.nn.relu(x @ p[0]) @ p[1]
x, y = rng.uniform(0.5, 1.5, (11, 6)), rng.integers(0, 3, 11)
cond = jlrp.concepts.conditional(f, jlrp.rules.epsilon(0.01), argnums=1)
refs = jlrp.concepts.maximize(cond, [(x[i:i + 5], y[i:i + 5]) for i in (0, 5, 10)], (jnp.asarray(w1, jnp.float32),
                              jnp.asarray(w2, jnp.float32)), layer=0, k=3, progress=False)  # default: split
np.savez(OUT, indices=refs.indices, scores=refs.scores, heatmaps=refs.heatmaps)
"""


def test_maximize_splits_batches_over_devices(tmp_path):
    """Two (forced) host devices: batches of 5, 5 and 1 are padded to 6 and split over them; the references
    equal a numpy epsilon-LRP of the two-layer net (float32 there, hence the tolerance)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("JAX_ENABLE_X64", None)
    code = f"OUT = {str(tmp_path / 'refs.npz')!r}" + SHARDED
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "refs.npz")
    rng = np.random.default_rng(0)
    w1, w2 = np.abs(rng.standard_normal((6, 5))) + 0.1, rng.standard_normal((5, 3))
    x, y = rng.uniform(0.5, 1.5, (11, 6)), rng.integers(0, 3, 11)
    w1, w2, x = (a.astype(np.float32).astype(np.float64) for a in (w1, w2, x))
    z = x @ w1
    out = np.maximum(z, 0) @ w2
    r1 = np.maximum(z, 0) * ((out * np.eye(3)[y] / (out + EPS * np.where(out >= 0, 1, -1))) @ w2.T)
    order = np.argsort(-r1, 0)[:3].T  # (5 units, 3)
    np.testing.assert_array_equal(got["indices"], order)
    np.testing.assert_allclose(got["scores"], np.take_along_axis(r1.T, order, 1), rtol=1e-5)
    for c in range(5):
        masked = r1[order[c]] * np.eye(5)[c]
        want = x[order[c]] * ((masked / (z[order[c]] + EPS * np.where(z[order[c]] >= 0, 1, -1))) @ w1.T)
        np.testing.assert_allclose(got["heatmaps"][c], want, rtol=1e-4, atol=1e-6)


# -- a CNN trained on the shapes: do the concepts of a class point at that class's shape? --------------------

class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(4)(x.mean((1, 2)))


@pytest.fixture(scope="module")
def shapes_cnn():
    train, test = jlrp.datasets.shapes(1024, size=24, seed=0), jlrp.datasets.shapes(256, size=24, seed=5)
    cnn = CNN()
    rng = np.random.default_rng(0)  # He-normal weights drawn by numpy: Flax's initialisers compile slowly
    shapes = jax.eval_shape(cnn.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 24, 24, 1), jnp.float32))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: np.zeros(s.shape, np.float32) if path[-1].key == "bias" else
        (rng.standard_normal(s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(np.float32), shapes)
    opt = optax.adam(5e-3)

    @jax.jit
    def step(params, state, x, y):
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(cnn.apply(q, x), y).mean()  # noqa: E731
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for idx in rng.integers(0, len(train), (300, 32)):
        params, state = step(params, state, train.x[idx], train.y[idx])
    accuracy = float(np.mean(np.asarray(jax.jit(cnn.apply)(params, test.x).argmax(-1)) == test.y))
    print(f"\nshapes CNN test accuracy {accuracy:.3f}")
    assert accuracy > 0.6  # chance is 0.25
    return cnn, params, test


def test_top_concepts_of_a_class_have_crops_of_that_class_shape(shapes_cnn):
    """The references of a class's most relevant concepts (relevance maximisation over 256 held-out images)
    show that class's shape: the crop is of an image of the class and at least a quarter of it is the deciding
    shape, more of it than of the distractor rings. Chance: the same crops on every image."""
    cnn, params, test = shapes_cnn
    cond = concepts.conditional(cnn.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    layer = jlrp.module_path("Conv_2")
    refs = concepts.maximize(cond, test.batches(64), params, layer=layer, k=6, progress=False)
    shape, ring, labels = test.mask, test.info["distractor_mask"], test.y
    per = np.asarray(jax.jit(lambda p, x: cond.concept_relevance(p, x, layer=layer, target=labels))(params, test.x))

    def shows(box, i, cls):
        t, l, b, r = box
        on, off = shape[i, t:b, l:r].sum(), ring[i, t:b, l:r].sum()
        return labels[i] == cls and on >= 0.25 * (b - t) * (r - l) and on > off

    hits, chance = [], []
    for cls in range(4):
        for c in np.argsort(-per[labels == cls].mean(0))[:2]:  # the class's two most relevant concepts
            for box, i in zip(refs.boxes[refs.row(c)], refs.indices[refs.row(c)]):
                hits.append(shows(box, i, cls))
                chance.append(np.mean([shows(box, j, cls) for j in range(len(labels))]))
    rate, base = float(np.mean(hits)), float(np.mean(chance))
    print(f"reference crops showing the class's shape: {rate:.2f} (chance {base:.2f})")
    assert rate >= 0.6 and rate >= base + 0.4, (rate, base)  # measured: 0.83 (chance 0.08)
