"""AttnLRP and CP-LRP on hand-built transformers, against two references written here independently of jlrp:

1. the AttnLRP / CP-LRP formulas (Achtibat et al. 2024; Ali et al. 2022) applied by hand, layer by layer, in
   float64 numpy on a forward pass computed here;
2. input x gradient of the model with AttnLRP's gradient patches (LXT's efficient form): identity on
   activations (gradient f(x)/x), gradients / 4 at q and k and / 2 at v and gates, norm statistics detached
   (for CP-LRP: q, k and the gate detached instead).

The models are small decoders: LayerNorm or RMSNorm, GELU or SwiGLU MLPs, learned and/or rotary positions, a
causal mask, grouped-query attention (4 query heads sharing 2 key/value heads), two pre-norm blocks, a final
norm and an LM head; the next token at the last position is explained.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp import composites, rules

jax.config.update("jax_enable_x64", True)  # as conftest does: the references are float64

B, T, D, N, K, HD, F, V, L = 2, 6, 16, 4, 2, 4, 24, 13, 2
TARGET = np.array([3, 7])  # the explained next token of each sequence


@dataclasses.dataclass(frozen=True)
class Cfg:
    blocks: tuple  # per block (norm, mlp): norm 'ln' | 'rms', mlp 'gelu' | 'swiglu'; the final norm: the last's
    learned: bool  # a learned position embedding added to the token embedding
    rope: bool  # rotary embeddings of q and k
    attention: str | None = "hand"  # written by hand, or jax.nn.dot_product_attention(implementation=...)
    remat: bool = False  # every block inside jax.checkpoint
    scan: bool = False  # the blocks (all of one kind) stacked and run by lax.scan


GPT = Cfg((("ln", "gelu"),) * L, learned=True, rope=False)
LLAMA = Cfg((("rms", "swiglu"),) * L, learned=False, rope=True)
MIXED = Cfg((("rms", "gelu"), ("ln", "swiglu")), learned=True, rope=True)
CONFIGS = {"gpt": GPT, "llama": LLAMA, "mixed": MIXED}


def init(seed: int = 0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    n = lambda *s, scale=0.4: jnp.asarray(scale * rng.normal(size=s), dtype)
    block = lambda: {"wq": n(D, N * HD), "bq": n(N * HD, scale=0.1), "wk": n(D, K * HD), "wv": n(D, K * HD),
                     "wo": n(N * HD, D), "bo": n(D, scale=0.1), "w1": n(D, F), "c1": n(F, scale=0.1),
                     "wu": n(D, F), "w2": n(F, D), "c2": n(D, scale=0.1), "g1": 1 + n(D, scale=0.1),
                     "b1": n(D, scale=0.1), "g2": 1 + n(D, scale=0.1), "b2": n(D, scale=0.1)}
    return {"emb": n(V, D, scale=1.0), "pos": n(T, D, scale=0.5), "head": n(D, V), "head_b": n(V, scale=0.1),
            "g": 1 + n(D, scale=0.1), "b": n(D, scale=0.1), "blocks": [block() for _ in range(L)]}


IDS = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------ the model (JAX), optionally patched

@jax.custom_vjp
def _scaled_grad(x, c):
    return x


_scaled_grad.defvjp(lambda x, c: (x, c), lambda c, g: (g * c, None))


def _identity_rule(f, x):
    """f(x) with the gradient f(x) / x, so that input x gradient passes relevance through unchanged."""
    ratio = jnp.where(x == 0, 0.0, f(x) / jnp.where(x == 0, 1.0, x))
    return jax.lax.stop_gradient(f(x) - ratio * x) + jax.lax.stop_gradient(ratio) * x


def _rotate_half(x):
    return jnp.concatenate([-x[..., HD // 2:], x[..., :HD // 2]], -1)


def _angles():
    freq = 1.0 / 10000 ** (np.arange(0, HD, 2) / HD)
    angle = np.arange(T)[:, None] * freq[None]
    angle = np.concatenate([angle, angle], -1)[:, None, :]  # (T, 1, HD)
    return np.cos(angle), np.sin(angle)


def _rope(x):
    cos, sin = (c.astype(x.dtype) for c in _angles())
    return x * cos + _rotate_half(x) * sin


def body(p, x, cfg: Cfg, patch: str | None = None):
    """Logits (B, T, V) from the token embedding's output ``x`` (B, T, D). ``patch``: None (the model itself),
    'attnlrp' or 'cp' (LXT's gradient patches)."""
    detach = jax.lax.stop_gradient if patch else (lambda v: v)
    act = _identity_rule if patch else (lambda f, v: f(v))

    def norm(kind, x, g, b):
        if kind == "ln":
            c = x - x.mean(-1, keepdims=True)
            return c / detach(jnp.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)) * g + b
        return x * detach(jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)) * g

    def block(x, w, kind, mlp):
        h = norm(kind, x, w["g1"], w["b1"])
        q = (h @ w["wq"] + w["bq"]).reshape(B, T, N, HD)
        k = (h @ w["wk"]).reshape(B, T, K, HD)
        v = (h @ w["wv"]).reshape(B, T, K, HD)
        if cfg.rope:
            q, k = _rope(q), _rope(k)
        if patch == "attnlrp":
            q, k, v = _scaled_grad(q, 0.25), _scaled_grad(k, 0.25), _scaled_grad(v, 0.5)
        elif patch == "cp":
            q, k = detach(q), detach(k)
        if cfg.attention == "hand":
            kk, vv = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)  # grouped-query attention
            s = jnp.einsum("btnd,bsnd->bnts", q, kk) / np.sqrt(HD)
            s = jnp.where(np.tril(np.ones((T, T), bool)), s, -jnp.inf)
            o = jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, -1), vv)
        else:
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
        x = x + (o.reshape(B, T, N * HD) @ w["wo"] + w["bo"])
        h = norm(kind, x, w["g2"], w["b2"])
        if mlp == "gelu":
            a = act(jax.nn.gelu, h @ w["w1"] + w["c1"])
        else:
            gate = act(jax.nn.silu, h @ w["w1"])
            a = (detach(gate) if patch == "cp" else gate) * (h @ w["wu"])
            a = _scaled_grad(a, 0.5) if patch == "attnlrp" else a
        return x + (a @ w["w2"] + w["c2"])

    if cfg.learned:
        x = x + p["pos"]
    runs = [functools.partial(block, kind=kind, mlp=mlp) for kind, mlp in cfg.blocks]
    runs = [jax.checkpoint(run) if cfg.remat else run for run in runs]
    if cfg.scan:  # as large models are run: one compiled block, its weights stacked
        x, _ = jax.lax.scan(lambda x, w: (runs[0](x, w), None), x, jax.tree.map(lambda *a: jnp.stack(a), *p["blocks"]))
    for run, w in zip([] if cfg.scan else runs, p["blocks"]):
        x = run(x, w)
    return norm(cfg.blocks[-1][0], x, p["g"], p["b"]) @ p["head"] + p["head_b"]


def next_token(p, ids, cfg: Cfg):
    """The model: next-token logits at the last position, (B, V)."""
    return body(p, p["emb"][ids], cfg)[:, -1]


#: tiny programs, compiled once each: XLA's backend optimisations would take most of the test's time
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def explainer(cfg: Cfg, variant: str, epsilon: float = 1e-6, report: bool = False):
    """AttnLRP or CP-LRP on the model, jitted (compiled once per setting and dtype)."""
    composite = {"attnlrp": composites.attnlrp, "cp": composites.cp_lrp}[variant](epsilon)
    return jit((jlrp.report if report else jlrp.lrp)(functools.partial(next_token, cfg=cfg), composite, argnums=1))


# ------------------------------------------------------------------------ reference 1: the formulas by hand

def _stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _rotate_half_t(u):
    """The transpose of rotate_half ([x1, x2] -> [-x2, x1]): [u1, u2] -> [u2, -u1]."""
    return np.concatenate([u[..., HD // 2:], -u[..., :HD // 2]], -1)


def reference(p, ids, cfg: Cfg, variant: str, eps: float, eps0: float = 1e-12):
    """Per-token relevance by AttnLRP ('attnlrp') or CP-LRP ('cp'), each rule applied by hand in numpy.
    ``eps``: stabilizer of dense layers, adds and products; ``eps0``: of the affine maps (LRP-0)."""
    p = jax.tree.map(np.asarray, p)
    cos, sin = _angles()
    share = 1.0 if variant == "cp" else 0.5  # of a product, for each factor that receives relevance

    def norm(kind, x, g, b):  # -> output, what the rule needs
        if kind == "ln":
            c = x - x.mean(-1, keepdims=True)
            sd = np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)
            return c / sd * g + b, (x, g / sd, c / sd * g + b)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g, None

    def norm_rule(saved, r):  # LayerNorm: epsilon over x -> (x - mean x) g / sd, sd constant. RMSNorm: identity
        if saved is None:
            return r
        x, scale, y = saved
        s = r / _stab(y, eps0) * scale
        return x * (s - s.mean(-1, keepdims=True))  # the centring matrix is symmetric

    def dense_rule(x, w, z, r):  # z = x @ w + b: the bias absorbs its share
        return x * ((r / _stab(z, eps)) @ w.T)

    def add_rule(a, b, r):
        s = r / _stab(a + b, eps)
        return a * s, b * s

    def rope_rule(x, y, r):  # epsilon over the linear map x -> x cos + rotate_half(x) sin
        s = r / _stab(y, eps)
        return x * (s * cos + _rotate_half_t(s * sin))

    # forward
    x0 = p["emb"][np.asarray(ids)]
    x = x0 + p["pos"] if cfg.learned else x0
    saved = []
    for w, (kind, mlp) in zip(p["blocks"], cfg.blocks):
        f = {"x": x}
        f["h1"], f["n1"] = norm(kind, x, w["g1"], w["b1"])
        f["q0"] = (f["h1"] @ w["wq"] + w["bq"]).reshape(B, T, N, HD)
        f["k0"] = (f["h1"] @ w["wk"]).reshape(B, T, K, HD)
        f["v"] = (f["h1"] @ w["wv"]).reshape(B, T, K, HD)
        rot = lambda a: a * cos + np.concatenate([-a[..., HD // 2:], a[..., :HD // 2]], -1) * sin
        f["q"], f["k"] = (rot(f["q0"]), rot(f["k0"])) if cfg.rope else (f["q0"], f["k0"])
        kk, vv = np.repeat(f["k"], N // K, 2), np.repeat(f["v"], N // K, 2)
        f["s"] = np.einsum("btnd,bsnd->bnts", f["q"], kk)
        f["logits"] = np.where(np.tril(np.ones((T, T), bool)), f["s"] / np.sqrt(HD), -np.inf)
        e = np.exp(f["logits"] - f["logits"].max(-1, keepdims=True))
        f["a"] = e / e.sum(-1, keepdims=True)
        f["o"] = np.einsum("bnts,bsnd->btnd", f["a"], vv)
        f["att"] = f["o"].reshape(B, T, N * HD) @ w["wo"] + w["bo"]
        x = f["x1"] = x + f["att"]
        f["h2"], f["n2"] = norm(kind, x, w["g2"], w["b2"])
        if mlp == "gelu":
            f["u"] = f["h2"] @ w["w1"] + w["c1"]
            f["m"] = np.asarray(jax.nn.gelu(f["u"]))  # the model's gelu (tanh approximation)
        else:
            f["u"], f["up"] = f["h2"] @ w["w1"], f["h2"] @ w["wu"]
            f["m"] = f["u"] / (1 + np.exp(-f["u"])) * f["up"]
        f["mlp"] = f["m"] @ w["w2"] + w["c2"]
        x = x + f["mlp"]
        saved.append(f)
    hf, nf = norm(cfg.blocks[-1][0], x, p["g"], p["b"])
    logits = hf[:, -1] @ p["head"] + p["head_b"]

    # backward, from the target logit
    r = np.zeros_like(logits)
    r[np.arange(B), TARGET] = logits[np.arange(B), TARGET]
    r_h = np.zeros((B, T, D))
    r_h[:, -1] = dense_rule(hf[:, -1], p["head"], logits, r)
    r = norm_rule(nf, r_h)
    for w, (kind, mlp), f in reversed(list(zip(p["blocks"], cfg.blocks, saved))):
        r_x1, r_mlp = add_rule(f["x1"], f["mlp"], r)
        r_m = dense_rule(f["m"], w["w2"], f["mlp"], r_mlp)
        if mlp == "gelu":  # gelu: identity
            r_h2 = dense_rule(f["h2"], w["w1"], f["u"], r_m)
        else:  # silu(u) * up: the epsilon-normalised product, its factors' shares; silu: identity
            r_up = share * r_m * f["m"] / _stab(f["m"], eps)
            r_gate = 0.0 * r_up if variant == "cp" else r_up
            r_h2 = dense_rule(f["h2"], w["w1"], f["u"], r_gate) + dense_rule(f["h2"], w["wu"], f["up"], r_up)
        r = r_x1 + norm_rule(f["n2"], r_h2)
        r_x, r_att = add_rule(f["x"], f["att"], r)
        r_o = dense_rule(f["o"].reshape(B, T, -1), w["wo"], f["att"], r_att).reshape(f["o"].shape)
        kk, vv = np.repeat(f["k"], N // K, 2), np.repeat(f["v"], N // K, 2)
        s_o = r_o / _stab(f["o"], eps)
        r_v = share * np.einsum("bnts,bsnd,btnd->bsnd", f["a"], vv, s_o)
        r_a = 0.0 * f["a"] if variant == "cp" else share * np.einsum("bnts,bsnd,btnd->bnts", f["a"], vv, s_o)
        x_sm = np.where(np.isfinite(f["logits"]), f["logits"], 0.0)
        r_s = x_sm * (r_a - f["a"] * r_a.sum(-1, keepdims=True))  # softmax (the 1/sqrt(d) scale: identity)
        s_s = 0.5 * r_s / _stab(f["s"], eps)  # q . k: half each
        r_q = f["q"] * np.einsum("bnts,bsnd->btnd", s_s, kk)
        r_k = kk * np.einsum("bnts,btnd->bsnd", s_s, f["q"])
        group = lambda a: a.reshape(B, T, K, N // K, HD).sum(3)  # a key/value head serves N/K query heads
        r_k, r_v = group(r_k), group(r_v)
        if cfg.rope:
            r_q, r_k = rope_rule(f["q0"], f["q"], r_q), rope_rule(f["k0"], f["k"], r_k)
        flat = lambda a: a.reshape(B, T, -1)
        r_h1 = (dense_rule(f["h1"], w["wq"], flat(f["q0"]), flat(r_q))
                + dense_rule(f["h1"], w["wk"], flat(f["k0"]), flat(r_k))
                + dense_rule(f["h1"], w["wv"], flat(f["v"]), flat(r_v)))
        r = r_x + norm_rule(f["n1"], r_h1)
    if cfg.learned:  # token + position: epsilon over the sum, the position embedding absorbs its share
        r = x0 * r / _stab(x0 + p["pos"], eps0)
    return r.sum(-1)


# ------------------------------------------------------------------------ reference 2: patched input x gradient

@functools.partial(jit, static_argnums=2)
def patched_gradients(p, ids, cfg: Cfg):
    """Per-token input x gradient at the token embedding's output of the AttnLRP- and the CP-patched model."""
    x = p["emb"][ids]
    out = {}
    for variant in ("attnlrp", "cp"):
        logit = lambda x: jnp.sum(body(p, x, cfg, variant)[:, -1][jnp.arange(B), TARGET])
        out[variant] = (x * jax.grad(logit)(x)).sum(-1)
    return out


# ------------------------------------------------------------------------ tests

def _conservation_gap(rep, explained):
    """|sum of token relevance + the layers' absorbed shares - the explained logits|, and the sum of the
    magnitudes of those terms (the scale of the rounding error)."""
    absorbed = [float(l.absorbed) for l in rep.layers]
    gap = abs(float(jnp.sum(rep.relevance)) + sum(absorbed) - float(jnp.sum(explained)))
    return gap, sum(map(abs, absorbed)) + float(jnp.sum(jnp.abs(rep.relevance))) + float(jnp.sum(jnp.abs(explained)))


def test_attnlrp_and_cp_lrp_equal_the_formulas_and_the_patched_gradient():
    """MIXED: block 0 RMSNorm + GELU, block 1 LayerNorm + SwiGLU, learned and rotary positions, GQA, causal."""
    p = init()
    patched = patched_gradients(p, IDS, MIXED)
    for variant in ("attnlrp", "cp"):
        r = explainer(MIXED, variant)(p, IDS, target=TARGET)
        assert rel_err(r, reference(p, IDS, MIXED, variant, eps=1e-6)) < 1e-9, variant
        r0 = explainer(MIXED, variant, 1e-12)(p, IDS, target=TARGET)  # the efficient form: the limit eps -> 0
        assert rel_err(r0, patched[variant]) < 1e-9, variant
        assert rel_err(r, r0) > 1e-8  # eps matters at this precision: the formulas see where it acts
    a, c = (explainer(MIXED, v)(p, IDS, target=TARGET) for v in ("attnlrp", "cp"))
    assert rel_err(a, c) > 0.05 and float(jnp.std(a)) > 0.1 * float(jnp.abs(a).mean())


#: a Llama-like block (RMSNorm, SwiGLU, rotary positions), run in float32 as models are
LLAMA = Cfg((("rms", "swiglu"),), learned=False, rope=True)


@pytest.mark.parametrize("variant", ["attnlrp", "cp"])
def test_fused_attention_equals_attention_by_hand(variant):
    """jax.nn.dot_product_attention gives the relevance of attention written by hand (its softmax runs in
    float32; on CPU implementation=None is the 'xla' program, checked here, so it is explained once). Had the
    fused softmax or its attention weights not been recognised, the relevance would differ by O(1)."""
    p = init(dtype=jnp.float32)
    fused = {impl: dataclasses.replace(LLAMA, attention=impl) for impl in (None, "xla")}
    jaxprs = {impl: str(jax.make_jaxpr(functools.partial(next_token, cfg=c))(p, IDS)) for impl, c in fused.items()}
    assert jaxprs[None] == jaxprs["xla"]
    hand = explainer(LLAMA, variant)(p, IDS, target=TARGET)
    assert rel_err(explainer(fused["xla"], variant)(p, IDS, target=TARGET), hand) < 2e-5


def test_conservation_in_float32_and_bfloat16_weights():
    """Token relevance + what the layers absorb (biases, stabilizers, position embeddings, the softmax's Taylor
    bias) == the explained logit, in float32. A bf16 model (weights and activations) explained with rules
    computed in float32 gives the float32 model's relevance to bf16 precision (relevance between layers is
    stored in the model's dtype)."""
    p = init(dtype=jnp.float32)
    rep = explainer(LLAMA, "attnlrp", report=True)(p, IDS, target=TARGET)
    gap, scale = _conservation_gap(rep, rep.output[np.arange(B), TARGET])
    assert rep.relevance.dtype == jnp.float32 and gap < 1e-6 * scale, (gap, scale)
    r16 = explainer(LLAMA, "attnlrp")(jax.tree.map(lambda a: a.astype(jnp.bfloat16), p), IDS, target=TARGET)
    assert r16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(r16)))
    assert rel_err(r16, rep.relevance) < 0.05, rel_err(r16, rep.relevance)


def test_checkpointed_and_scanned_blocks():
    """jax.checkpoint blocks stay checkpointed and give the same relevance; a lax.scan over checkpointed
    blocks (stacked weights, as large models run) gives the formulas' relevance."""
    p = init()
    remat = explainer(dataclasses.replace(MIXED, remat=True), "attnlrp")
    jaxpr = str(remat.trace(p, IDS, target=TARGET).jaxpr)
    assert jaxpr.count("differentiated=True") >= L  # the backward pass recomputes each block
    assert rel_err(remat(p, IDS, target=TARGET), explainer(MIXED, "attnlrp")(p, IDS, target=TARGET)) < 1e-12
    scanned = Cfg((("rms", "swiglu"),) * L, learned=True, rope=True, remat=True, scan=True)
    r = explainer(scanned, "attnlrp")(p, IDS, target=TARGET)
    assert rel_err(r, reference(p, IDS, scanned, "attnlrp", eps=1e-6)) < 1e-9


def test_contrastive_next_token_and_latent_units():
    """Token a vs token b: the initial relevance ``logits * (onehot(a) - onehot(b))``; relevance is linear in
    it. The same report gives the relevance of every residual-stream unit (top-k per example)."""
    p = init()
    explain = jit(jlrp.report(functools.partial(next_token, cfg=MIXED), composites.attnlrp(), argnums=1))
    logits = explain(p, IDS, relevance=jnp.zeros((B, V))).output  # the model's output, from the same program
    a, b = jax.nn.one_hot(TARGET, V), jax.nn.one_hot(np.array([5, 0]), V)
    rep = explain(p, IDS, relevance=logits * (a - b))
    ra, rb = (explain(p, IDS, relevance=logits * m).relevance for m in (a, b))
    assert rel_err(rep.relevance, ra - rb) < 1e-12
    assert rel_err(ra, explainer(MIXED, "attnlrp")(p, IDS, target=TARGET)) < 1e-12
    gap, scale = _conservation_gap(rep, logits * (a - b))
    assert gap < 1e-12 * scale

    stream = [l for l in rep.layers if l.info.kind == "add"][-1]  # the residual stream after the last block
    per_unit, values, indices = composites.top_units(stream.relevance, 3)
    np.testing.assert_allclose(per_unit, np.asarray(stream.relevance).sum(1), rtol=1e-12)
    np.testing.assert_array_equal(indices, np.argsort(-np.asarray(per_unit), 1)[:, :3])
    np.testing.assert_allclose(values, np.take_along_axis(np.asarray(per_unit), np.asarray(indices), 1))
    with pytest.raises(ValueError, match="k=17"):
        composites.top_units(stream.relevance, 17)


def _attention(x, w, mask: str):
    """One attention layer over a float input (T, D) with L2-normalised queries and keys, summed over tokens."""
    q, k, v = x @ w[0], x @ w[1], x @ w[2]
    q, k = q / jnp.linalg.norm(q, axis=-1, keepdims=True), k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    s = 4.0 * q @ k.T
    causal = np.tril(np.ones((len(x), len(x)), bool))
    if mask == "where":
        s = jnp.where(causal, s, -jnp.inf)
    else:  # an additive mask: the softmax's input is -inf (or -1e9) at masked places
        s = s + np.where(causal, 0.0, -np.inf if mask == "-inf" else -1e9)
    return (jax.nn.softmax(s, -1) @ v).sum(0)


def test_softmax_rule_masks_and_l2_norms():
    """The softmax rule x * (R - s sum R) by hand at one attention layer; masked logits (where, an additive -inf
    or -1e9) give the same relevance; L2-normalised queries and keys pass relevance unchanged."""
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(5, 6)), rng.normal(size=(3, 6, 6))
    explain = lambda mask, how: jit(how(functools.partial(_attention, w=w, mask=mask), composites.attnlrp(),
                                        argnums=0))(x, target=2)
    rep = explain("where", jlrp.report)
    for mask in ("-inf", "-1e9"):
        r = explain(mask, jlrp.lrp)
        assert bool(np.all(np.isfinite(r))) and rel_err(r, rep.relevance) < 1e-12, mask
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    logits = 4.0 * unit(x @ w[0]) @ unit(x @ w[1]).T
    causal = np.tril(np.ones((5, 5), bool))
    e = np.where(causal, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    s = e / e.sum(-1, keepdims=True)
    r_s = np.asarray(next(l for l in rep.layers if l.rule == "softmax" and float(l.total) != 0).relevance)
    scores = [l for l in rep.layers if l.info.kind == "product" and l.info.output_shape == (5, 5)]
    assert len(scores) == 1  # (4 q) k^T: its output is the softmax's input
    expected = np.where(causal, logits, 0.0) * (r_s - s * r_s.sum(-1, keepdims=True))
    np.testing.assert_allclose(scores[0].relevance, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    norms = [l for l in rep.layers if l.info.kind == "affine" and l.info.output_shape == (5, 6)]
    assert len(norms) == 2 and all(abs(float(l.absorbed)) < 1e-9 * abs(float(l.total)) for l in norms)


@pytest.mark.parametrize("cap", [2.0, 1e8])
def test_soft_capped_softmax_uses_the_capped_logits(cap):
    """Gemma 2's soft-capping c tanh(z / c) before the softmax: the softmax rule takes the capped logits g as
    its x (R_g = g (R - s sum R)) and the capping passes relevance unchanged; a cap far above the logits
    explains like no cap."""
    rng = np.random.default_rng(5)
    z, v = rng.normal(size=(1, 7)) * 3, rng.normal(size=(7, 4))
    capped = lambda z: cap * jnp.tanh(z / cap)
    model = lambda z: jax.nn.softmax(capped(z), -1) @ v
    r = jlrp.lrp(model, composites.attnlrp(epsilon=1e-12), argnums=0)(z, target=1)
    g = np.asarray(capped(z))
    s = np.exp(g - g.max()) / np.exp(g - g.max()).sum()
    r_s = s * v[:, 1]  # the epsilon rule of the dense read-out (no bias): s_j v_j1 (sum = the logit)
    expected = g * (r_s - s * r_s.sum())
    np.testing.assert_allclose(r, expected, rtol=1e-9, atol=1e-12)
    if cap > 1e6:
        plain = jlrp.lrp(lambda z: jax.nn.softmax(z, -1) @ v, composites.attnlrp(epsilon=1e-12), argnums=0)
        np.testing.assert_allclose(r, plain(z, target=1), rtol=1e-6)


def test_vit_recipe_gamma_per_layer_and_cp_attention():
    def vit(params, images):  # a tiny ViT: 4x4 patches, a class token, one block, the class token's head
        patches = jax.lax.conv_general_dilated(images, params["patch"], (4, 4), "VALID",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
        tokens = patches.reshape(images.shape[0], -1, D)
        tokens = jnp.concatenate([jnp.broadcast_to(params["cls"], (images.shape[0], 1, D)), tokens], 1)
        h = tokens + params["pos"]
        c = h - h.mean(-1, keepdims=True)
        n = c / jnp.sqrt((c * c).mean(-1, keepdims=True) + 1e-6)
        q, k, v = n @ params["wq"], n @ params["wk"], n @ params["wv"]
        h = h + jax.nn.softmax(q @ jnp.swapaxes(k, 1, 2) / 4.0, -1) @ v @ params["wo"]
        h = h + jax.nn.gelu(h @ params["w1"]) @ params["w2"]
        return h[:, 0] @ params["head"]

    rng = np.random.default_rng(4)
    shapes = {"patch": (4, 4, 3, D), "cls": (D,), "pos": (5, D), "wq": (D, D), "wk": (D, D), "wv": (D, D),
              "wo": (D, D), "w1": (D, F), "w2": (F, D), "head": (D, 3)}
    params = {k: jnp.asarray(0.3 * rng.normal(size=s)) for k, s in shapes.items()}
    images = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)))
    gammas = lambda info: 1.0 if info.kind == "conv" else 0.0 if info.last else 0.1
    explain = jlrp.report(vit, composites.vit(gamma=gammas), argnums=1)
    rules_by_kind = {(l.info.kind, l.info.linear_index, l.rule) for l in jax.eval_shape(explain, params, images,
                                                                                        target=1).layers}
    linear = sorted((i, r) for kind, i, r in rules_by_kind if i is not None)
    assert linear == [(0, "gamma(1)")] + [(i, "gamma(0.1)") for i in range(1, 7)] + [(7, "epsilon(1e-06)")]
    assert {r for kind, _, r in rules_by_kind if kind == "product"} == {"cp"}
    assert {r for kind, _, r in rules_by_kind if kind == "dense"} >= {"gamma(0.1)"}
    rep = jit(explain)(params, images, target=1)
    assert bool(jnp.all(jnp.isfinite(rep.relevance))) and rep.relevance.shape == images.shape
    gap = float(jnp.sum(rep.initial)) - float(jnp.sum(rep.relevance)) - sum(float(l.absorbed) for l in rep.layers)
    assert abs(gap) < 1e-9
    with pytest.raises(TypeError, match="resolved by a Composite"):
        rules.PerLayer(lambda info: rules.epsilon()).backward(None, (), None, None)


def _score_shaped_values(fn, *args) -> int:
    """How many values of the attention scores' shape (..., T, T) with rank >= 4 a program computes (not
    counting calls, whose bodies are walked, and stop_gradient, which computes nothing)."""
    def walk(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name not in ("jit", "pjit", "stop_gradient"):
                n += sum(v.aval.ndim >= 4 and v.aval.shape[-2:] == (T, T) for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        n += walk(sub)
        return n
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_cp_lrp_computes_nothing_behind_constant_attention_weights():
    """Under CP-LRP the attention weights are constants, so the softmax, q.k^T and the q / k projections get
    no relevance: they pass a symbolic zero back and no backward work is done for them (the explanation
    computes no score-shaped value the model does not compute). AttnLRP, which explains them, does."""
    p = init(dtype=jnp.float32)
    model = functools.partial(next_token, cfg=GPT)
    forward = _score_shaped_values(model, p, IDS)
    assert forward > 0
    counts = {v: _score_shaped_values(lambda p, ids, c=c: jlrp.lrp(model, c, argnums=1)(p, ids, target=TARGET),
                                       p, IDS)
              for v, c in (("cp", composites.cp_lrp()), ("attnlrp", composites.attnlrp()))}
    assert counts["cp"] == forward, counts
    assert counts["attnlrp"] > forward, counts
