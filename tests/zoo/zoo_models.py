"""The model zoo: small, randomly initialised models from the JAX ecosystem, built from configs.

Nothing is downloaded: every model is constructed from a config with random weights. Each entry gives a
function ``fn(params, x) -> (batch, classes)`` in the library's own calling convention (its public call
API where it has one), its parameters, a batch of 2 inputs and what kind of input it explains.

Parameters are initialised by the library's own initialisers inside one ``jax.jit`` compiled without XLA
optimisation (``xla_backend_optimization_level=0``): eager initialisation compiles one program per
parameter shape and takes 5-90 s per model on 2 cores, an optimised compile of the whole initialiser
3-30 s, this 1-4 s. Only the initial values are affected (random numbers); the models under test run
exactly as the library defines them. Keras builds its layers eagerly, so the Keras applications are large
and slow to build (16-90 s each): they run under ``@pytest.mark.slow``, and two small Keras models made
of the same layers run by default (see ``keras-mini-*``).

Import this module with the zoo's float32 setting active (``jax.enable_x64(False)``): the repository's
test session enables x64, which the libraries here are not written for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

BATCH = 2
IMAGE = 32  # height and width of every image model's input
SEQ = 8  # tokens per sequence
VOCAB = 128
CLASSES = 5

O0 = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass
class ZooModel:
    family: str
    name: str
    fn: Callable  # fn(params, x) -> (BATCH, classes)
    params: Any
    x: Any  # the explained input: images (float) or token ids (int)
    kind: str  # "image" or "tokens"
    relu_cnn: bool = False  # piecewise-linear ReLU CNN: LRP-0 must equal input x gradient
    box: tuple[float, float] | None = None  # input bounds for epsilon_gamma_box (image models)
    dtype: str = "float32"
    context: Callable[[], Any] = contextlib.nullcontext  # e.g. the explicit mesh a library builds under
    argnums: int = 1
    note: str = ""
    # token models whose positions the library computes from the ids (RoBERTa, gemma): the same model with
    # those positions passed in as constants; token relevance must not change (positions carry none)
    fn_constant_positions: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str
    name: str
    build: Callable[[], ZooModel]
    slow: bool = False


def _compile_o0(f: Callable, *args):
    """Run ``f(*args)`` as one jitted program compiled without XLA optimisation (fast to compile)."""
    return jax.jit(f).lower(*args).compile(compiler_options=O0)(*args)


def _images(layout: str = "NHWC", seed: int = 0) -> jax.Array:
    shape = (BATCH, IMAGE, IMAGE, 3) if layout == "NHWC" else (BATCH, 3, IMAGE, IMAGE)
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


def _ids(seed: int = 1, low: int = 1) -> jax.Array:
    # low=1: id 0 is a padding token in some libraries (gemma); a random sequence has no padding
    return jax.random.randint(jax.random.key(seed), (BATCH, SEQ), low, VOCAB, jnp.int32)


def _perturb_statistics(tree, seed: int = 7):
    """Give BatchNorm running statistics non-trivial values (a fresh model has mean 0, variance 1), so
    canonization (folding BatchNorm into the conv) is exercised as in a trained model. numpy: eager
    jax.random would compile one program per shape."""
    rng = np.random.default_rng(seed)

    def leaf(path, v):
        name = jax.tree_util.keystr(path).lower()
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)
        if "mean" in name:
            return jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
        return v

    return jax.tree_util.tree_map_with_path(leaf, tree)


# --------------------------------------------------------------------------- Hugging Face transformers (Flax)

def _hf(cls_name: str, config, init_shape, x, kind, output="logits", relu_cnn=False, stats=False, note="",
        positions=None):
    import transformers

    cls = getattr(transformers, cls_name)
    model = cls(config, input_shape=init_shape, seed=0, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1).lower(
        jax.random.PRNGKey(0), init_shape).compile(compiler_options=O0)(jax.random.PRNGKey(0))
    if stats:
        params = {**params, "batch_stats": _perturb_statistics(params["batch_stats"])}

    def fn(params, x, **kwargs):
        out = getattr(model(x, params=params, train=False, **kwargs), output)
        return out[:, -1] if out.ndim == 3 else out  # language models: the next-token logits

    fixed = None
    if positions is not None:
        position_ids = positions(x)
        fixed = lambda params, x: fn(params, x, position_ids=position_ids)  # noqa: E731
    return ZooModel("transformers", "", fn, params, x, kind, relu_cnn=relu_cnn,
                    box=(0.0, 1.0) if kind == "image" else None, note=note, fn_constant_positions=fixed)


def _hf_vision_kwargs():
    return dict(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2)


def _hf_text_kwargs():
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=32)


def hf_resnet():
    import transformers as T
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                         num_labels=CLASSES)
    return _hf("FlaxResNetForImageClassification", cfg, (1, IMAGE, IMAGE, 3), _images("NCHW"), "image",
               relu_cnn=True, stats=True, note="NCHW input (the wrapper transposes)")


def hf_regnet():
    import transformers as T
    cfg = T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8,
                         num_labels=CLASSES)  # layer_type "y": squeeze-and-excitation gates
    return _hf("FlaxRegNetForImageClassification", cfg, (1, IMAGE, IMAGE, 3), _images("NCHW"), "image",
               stats=True)


def hf_vit():
    import transformers as T
    cfg = T.ViTConfig(intermediate_size=64, num_labels=CLASSES, **_hf_vision_kwargs())
    return _hf("FlaxViTForImageClassification", cfg, (1, IMAGE, IMAGE, 3), _images("NCHW"), "image")


def hf_dinov2():
    import transformers as T
    cfg = T.Dinov2Config(mlp_ratio=2, num_labels=CLASSES, **_hf_vision_kwargs())
    return _hf("FlaxDinov2ForImageClassification", cfg, (1, IMAGE, IMAGE, 3), _images("NCHW"), "image")


def hf_clip_vision():
    import transformers as T
    cfg = T.CLIPVisionConfig(intermediate_size=64, **_hf_vision_kwargs())
    return _hf("FlaxCLIPVisionModel", cfg, (1, IMAGE, IMAGE, 3), _images("NCHW"), "image",
               output="pooler_output", note="explains one unit of the pooled embedding")


def hf_bert():
    import transformers as T
    cfg = T.BertConfig(num_labels=3, **_hf_text_kwargs())
    return _hf("FlaxBertForSequenceClassification", cfg, (1, SEQ), _ids(), "tokens")


def hf_roberta():
    import transformers as T
    from transformers.models.roberta.modeling_flax_roberta import create_position_ids_from_input_ids
    cfg = T.RobertaConfig(num_labels=3, pad_token_id=0, **_hf_text_kwargs())
    return _hf("FlaxRobertaForSequenceClassification", cfg, (1, SEQ), _ids(), "tokens",
               positions=lambda ids: create_position_ids_from_input_ids(ids, cfg.pad_token_id),
               note="positions computed from the ids (cumsum of ids != pad)")


def hf_distilbert():
    import transformers as T
    cfg = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                             max_position_embeddings=32, num_labels=3)
    return _hf("FlaxDistilBertForSequenceClassification", cfg, (1, SEQ), _ids(), "tokens")


def hf_gpt2():
    import transformers as T
    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    return _hf("FlaxGPT2LMHeadModel", cfg, (1, SEQ), _ids(), "tokens", note="next-token logits")


def hf_llama():
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=32)
    return _hf("FlaxLlamaForCausalLM", cfg, (1, SEQ), _ids(), "tokens", note="next-token logits")


# --------------------------------------------------------------------------- Keras 3 (JAX backend)

def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras was imported with the {keras.backend.backend()!r} backend; the zoo needs "
                           f"KERAS_BACKEND=jax set before keras is first imported")
    return keras


def _keras_model(model, relu_cnn=False, note=""):
    keras = _keras()
    trainable = [v.value for v in model.trainable_variables]
    names = [v.path for v in model.non_trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    # trained-looking BatchNorm statistics (a fresh model has moving mean 0 and variance 1)
    non_trainable = [_perturb_statistics({n: v})[n] if ("moving_" in n) else v
                     for n, v in zip(names, non_trainable)]

    def fn(params, x):
        trainable, non_trainable = params
        out, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return out

    del keras
    return ZooModel("keras", "", fn, (trainable, non_trainable), _images("NHWC"), "image", relu_cnn=relu_cnn,
                    box=(0.0, 1.0), note=note)


def _keras_app(ctor_name: str, relu_cnn=False):
    keras = _keras()
    keras.utils.set_random_seed(0)
    ctor = getattr(keras.applications, ctor_name)
    model = ctor(weights=None, input_shape=(IMAGE, IMAGE, 3), classes=CLASSES, classifier_activation=None)
    return _keras_model(model, relu_cnn=relu_cnn, note=f"keras.applications.{ctor_name}(weights=None)")


def _numpy_init(seed: int):
    """A Keras kernel initializer drawing LeCun-normal weights with numpy: Keras initialises eagerly, and
    jax.random would compile one program per kernel shape (the two small models built in ~30-60 s)."""
    keras = _keras()
    rng = np.random.default_rng(seed)

    class NumpyLecunNormal(keras.initializers.Initializer):
        def __call__(self, shape, dtype=None):
            fan_in = int(np.prod(shape[:-1])) or 1
            return keras.ops.convert_to_tensor(rng.standard_normal(shape) / np.sqrt(fan_in), dtype or "float32")

    return NumpyLecunNormal()


def keras_mini_relu_cnn():
    """ResNet50 / VGG16 / DenseNet121 building blocks: ZeroPadding, Conv2D (+bias), BatchNormalization,
    ReLU, MaxPooling2D, residual Add, Concatenate (dense block), AveragePooling2D, GlobalAveragePooling2D,
    Flatten, Dense. A ReLU CNN: LRP-0 must equal input x gradient."""
    keras = _keras()
    L = keras.layers
    k = dict(kernel_initializer=_numpy_init(0))
    inp = keras.Input((IMAGE, IMAGE, 3))
    h = L.ZeroPadding2D(1)(inp)
    h = L.Conv2D(8, 3, strides=2, use_bias=False, **k)(h)  # ResNet stem
    h = L.Activation("relu")(L.BatchNormalization()(h))
    h = L.MaxPooling2D(3, strides=2, padding="same")(h)
    r = L.Conv2D(8, 3, padding="same", **k)(h)  # ResNet block (conv + bias + BN)
    r = L.ReLU()(L.BatchNormalization()(r))
    r = L.BatchNormalization()(L.Conv2D(8, 3, padding="same", **k)(r))
    h = L.Activation("relu")(L.Add()([h, r]))
    d = L.Activation("relu")(L.BatchNormalization()(h))  # DenseNet block: BN-ReLU-conv, concatenated
    d = L.Conv2D(4, 3, padding="same", use_bias=False, **k)(d)
    h = L.Concatenate()([h, d])
    h = L.Activation("relu")(L.BatchNormalization()(h))  # DenseNet transition
    h = L.AveragePooling2D(2)(L.Conv2D(8, 1, use_bias=False, **k)(h))
    v = L.Conv2D(8, 3, padding="same", activation="relu", **k)(h)  # VGG: conv-relu, max pool, flatten, dense
    v = L.Flatten()(L.MaxPooling2D(2)(v))
    v = L.Dense(16, activation="relu", **k)(v)
    g = L.GlobalAveragePooling2D()(h)
    out = L.Dense(CLASSES, **k)(L.Concatenate()([g, v]))
    return _keras_model(keras.Model(inp, out), relu_cnn=True,
                        note="same layers as ResNet50 / VGG16 / DenseNet121 (slow tests)")


def keras_mini_mobile_cnn():
    """MobileNetV2 / EfficientNetB0 / ConvNeXtTiny building blocks: Rescaling and Normalization
    (preprocessing inside the model), DepthwiseConv2D, ReLU6 inverted residual, swish with a
    squeeze-and-excitation Multiply, LayerNormalization, 7x7 depthwise + pointwise Dense with GELU and a
    layer scale, GlobalAveragePooling2D, Dropout, Dense."""
    keras = _keras()
    L = keras.layers
    init = _numpy_init(1)
    k, dw = dict(kernel_initializer=init), dict(depthwise_initializer=init)
    inp = keras.Input((IMAGE, IMAGE, 3))
    h = L.Rescaling(2.0, offset=-1.0)(inp)
    h = L.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.2, 0.3, 0.25])(h)
    h = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, **k)(h)  # MobileNetV2 stem and block
    h = L.ReLU(6.0)(L.BatchNormalization()(h))
    e = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False, **k)(h)))
    e = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, **dw)(e)))
    e = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False, **k)(e))
    h = L.Add()([h, e])
    s = L.DepthwiseConv2D(3, padding="same", use_bias=False, **dw)(h)  # EfficientNet MBConv with SE
    s = L.Activation("swish")(L.BatchNormalization()(s))
    g = L.GlobalAveragePooling2D(keepdims=True)(s)
    g = L.Conv2D(4, 1, activation="swish", **k)(g)
    g = L.Conv2D(8, 1, activation="sigmoid", **k)(g)
    s = L.Multiply()([s, g])
    s = L.Dropout(0.2)(L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False, **k)(s)))
    h = L.Add()([h, s])
    c = L.DepthwiseConv2D(7, padding="same", **dw)(h)  # ConvNeXt block: dw 7x7, LayerNorm, GELU MLP, scale
    c = L.LayerNormalization(epsilon=1e-6)(c)
    c = L.Dense(32, activation="gelu", **k)(c)
    c = L.Dense(8, **k)(c)
    c = LayerScale(1e-1)(c)
    h = L.Add()([h, c])
    h = L.GlobalAveragePooling2D()(h)
    h = L.LayerNormalization(epsilon=1e-6)(h)
    out = L.Dense(CLASSES, **k)(h)
    return _keras_model(keras.Model(inp, out),
                        note="same layers as MobileNetV2 / EfficientNetB0 / ConvNeXtTiny (slow tests)")


@functools.cache
def _layer_scale_cls():
    keras = _keras()

    class _LayerScale(keras.layers.Layer):
        """ConvNeXt's layer scale: a learned per-channel multiplier (as in keras.applications.convnext)."""

        def __init__(self, init_value, **kwargs):
            super().__init__(**kwargs)
            self.init_value = init_value

        def build(self, input_shape):
            self.gamma = self.add_weight(shape=(input_shape[-1],),
                                         initializer=keras.initializers.Constant(self.init_value))

        def call(self, x):
            return x * self.gamma

    return _LayerScale


def LayerScale(init_value):  # noqa: N802 (a layer constructor)
    return _layer_scale_cls()(init_value)


# --------------------------------------------------------------------------- jax-image-models (jimm, Flax NNX)

@functools.cache
def _mesh():
    from jax.sharding import AxisType
    # jimm's parameters are annotated with the "fsdp" mesh axis and its layers read the shardings of their
    # inputs (explicit sharding), so models are built and run under an explicit mesh, as the library does
    return jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Explicit,))


def _jimm(make: Callable, x, kind, note=""):
    from flax import nnx

    mesh = _mesh()
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(make)
        graphdef, _ = nnx.split(abstract)
        state = _compile_o0(lambda: nnx.state(make()))
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    return ZooModel("jimm", "", fn, state, x, kind, box=(0.0, 1.0) if kind == "image" else None,
                    context=lambda: jax.set_mesh(mesh), note=note or "explicit mesh ('fsdp',) of 1 device")


def jimm_vit():
    import jimm
    from flax import nnx
    return _jimm(lambda: jimm.VisionTransformer(num_classes=CLASSES, img_size=IMAGE, patch_size=8, num_layers=2,
                                                num_heads=2, mlp_dim=64, hidden_size=32, dropout_rate=0.0,
                                                rngs=nnx.Rngs(0)), _images(), "image")


def jimm_dinov2():
    import jimm
    from flax import nnx
    from jimm.common.sharding import NoSharding
    # NoSharding: with its default DINOv2Sharding the model itself fails under jax 0.10 explicit sharding
    # (the MLP's down projection contracts two 'fsdp'-sharded dimensions and needs an out_sharding)
    return _jimm(lambda: jimm.DINOv2Model(img_size=IMAGE, patch_size=8, hidden_size=32, num_layers=2,
                                          num_heads=2, mlp_dim=64, rngs=nnx.Rngs(0), sharding=NoSharding),
                 _images(), "image", note="explicit mesh, parameters replicated (NoSharding); explains one unit "
                                          "of the CLS embedding")


def jimm_siglip_vision():
    import jimm
    from flax import nnx
    return _jimm(lambda: jimm.SigLIPVisionModel(image_resolution=IMAGE, vision_layers=2, vision_hidden_size=64,
                                                vision_patch_size=8, rngs=nnx.Rngs(0)), _images(), "image",
                 note="attention-pooling head; explains one unit of the embedding")


def jimm_clip_text():
    import jimm
    from flax import nnx
    return _jimm(lambda: jimm.CLIPTextModel(context_length=SEQ, vocab_size=VOCAB, text_hidden_size=32,
                                            num_text_heads=2, num_text_layers=2, rngs=nnx.Rngs(0)),
                 _ids(), "tokens", note="explains one unit of the text embedding")


# --------------------------------------------------------------------------- equimo (Equinox)

def _equinox(make: Callable, note=""):
    import equinox as eqx

    abstract = eqx.filter_eval_shape(make)
    _, static = eqx.partition(abstract, eqx.is_array)
    params = _compile_o0(lambda: eqx.partition(make(), eqx.is_array)[0])
    key = jax.random.key(42)

    def fn(params, x):
        model = eqx.combine(params, static)
        return jax.vmap(lambda xi: model(xi, key=key, inference=True))(x)

    return ZooModel("equimo", "", fn, params, _images("NCHW"), "image", box=(0.0, 1.0),
                    note=note or "CHW images, vmapped")


def equimo_convnext():
    import equimo.models as em
    return _equinox(lambda: em.ConvNeXt(3, depths=[1], dims=[16], num_classes=CLASSES,
                                        key=jax.random.key(0)))


def equimo_vit_registers():
    import equimo.models as em
    return _equinox(lambda: em.VisionTransformer(img_size=IMAGE, in_channels=3, dim=32, patch_size=8,
                                                 num_heads=[2], depths=[1], reg_tokens=4, init_values=1e-5,
                                                 num_classes=CLASSES, key=jax.random.key(0)),
                    note="4 register tokens, layer scale")


def equimo_mobilenetv3():
    import equimo.models as em
    cfg = [(16, 16, 3, 2, True, "relu"), (16, 32, 3, 1, True, "hard_swish")]
    return _equinox(lambda: em.MobileNetv3(3, cfg, last_channels=64, num_classes=CLASSES,
                                           key=jax.random.key(0)),
                    note="squeeze-and-excitation, hard swish")


def equimo_mlla():
    import equimo.models as em
    return _equinox(lambda: em.Mlla(img_size=IMAGE, in_channels=3, dim=16, patch_size=4, depths=[1],
                                    num_heads=[2], num_classes=CLASSES, key=jax.random.key(0)),
                    note="Mamba-like linear attention")


def equimo_vssd():
    import equimo.models as em
    return _equinox(lambda: em.Vssd(img_size=IMAGE, in_channels=3, dim=16, d_state=8, patch_size=4,
                                    depths=[1], num_heads=[2], attentions_layers=("mamba2mixer",),
                                    num_classes=CLASSES, key=jax.random.key(0)),
                    note="non-causal state space duality (Mamba2 mixer)")


def equimo_reduceformer():
    import equimo.models as em
    return _equinox(lambda: em.ReduceFormer(3, widths=[8, 16], depths=[1, 1],
                                            block_types=["conv", "attention"], head_dim=8,
                                            num_classes=CLASSES, key=jax.random.key(0)),
                    note="attention by summation")


# --------------------------------------------------------------------------- penzai

def _penzai(build: Callable, note=""):
    from penzai import pz

    model = _compile_o0(lambda: pz.freeze_params(build(jax.random.key(0))))

    def fn(model, ids):
        tokens = pz.nx.wrap(ids).tag("batch", "seq")
        logits = model(tokens)  # named axes batch, seq, vocabulary
        return logits.untag("batch", "seq", "vocabulary").unwrap()[:, -1]

    return ZooModel("penzai", "", fn, model, _ids(), "tokens", note=note or "next-token logits")


def _penzai_llamalike(**overrides):
    from penzai.models.transformer.variants import llamalike_common as llc
    kw = dict(num_kv_heads=1, query_head_multiplier=2, embedding_dim=32, projection_dim=16, mlp_hidden_dim=64,
              num_decoder_blocks=1, vocab_size=VOCAB, mlp_variant="swiglu", tie_embedder_and_logits=False)
    kw.update(overrides)
    cfg = llc.LlamalikeTransformerConfig(**kw)
    return lambda key: llc.build_llamalike_transformer(cfg, init_base_rng=key)


def penzai_llama():
    return _penzai(_penzai_llamalike(), note="Llama: grouped-query attention, SwiGLU, RMSNorm, RoPE")


def penzai_gemma_like():
    from penzai.models.transformer.variants import llamalike_common as llc
    return _penzai(_penzai_llamalike(
        num_decoder_blocks=2, mlp_variant="geglu_approx", tie_embedder_and_logits=True, use_post_attn_norm=True,
        use_post_ffw_norm=True, final_logit_softcap=30.0, attn_logits_soft_cap=50.0,
        attention_type=(llc.AttentionTypeSlidingWindowCausal(4), llc.AttentionTypeGlobalCausal())),
        note="Gemma-2-like: GeGLU, tied embeddings, soft caps, sliding-window + global attention")


def penzai_gpt_neox():
    from penzai.models.transformer.variants import gpt_neox
    cfg = gpt_neox.GPTNeoXTransformerConfig(
        num_attention_heads=2, embedding_dim=32, projection_dim=16, mlp_hidden_dim=64, num_decoder_blocks=1,
        vocab_size=VOCAB, activation_fn="gelu_exact", rope_subset_size=8, rope_wavelength=10_000,
        layernorm_epsilon=1e-5, parameter_dtype=jnp.float32, activation_dtype=jnp.float32)
    return _penzai(lambda key: gpt_neox.build_gpt_neox_transformer(cfg, init_base_rng=key),
                   note="GPT-NeoX: parallel attention + MLP, partial RoPE, LayerNorm")


def penzai_llama_layer_stack():
    return _penzai(_penzai_llamalike(use_layer_stack=True, num_decoder_blocks=2),
                   note="Llama with its blocks in a LayerStack (a scan over stacked parameters)")


# --------------------------------------------------------------------------- gemma (gm.nn.Transformer)

def _gemma(dtype):
    from gemma import gm

    C = gm.nn.config
    cfg = C.TransformerConfig(
        num_embed=VOCAB, embed_dim=32, hidden_dim=64, num_heads=2, head_dim=16, num_kv_heads=1,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
        attention_types=(C.AttentionType.LOCAL_SLIDING, C.AttentionType.GLOBAL), sliding_window_size=4,
        query_pre_attn_norm=C.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM)
    model = gm.nn.Transformer(config=cfg, dtype=dtype)
    ids = _ids()
    params = _compile_o0(lambda ids: model.init(jax.random.key(0), ids)["params"], ids)

    def fn(params, ids, **kwargs):
        return model.apply({"params": params}, ids, return_last_only=True, **kwargs).logits

    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), ids.shape)  # no padding in ids
    name = jnp.dtype(dtype).name
    return ZooModel("gemma", "", fn, params, ids, "tokens", dtype=name,
                    fn_constant_positions=lambda params, ids: fn(params, ids, positions=positions),
                    note="Gemma-3-like: local sliding + global attention, QK norm; positions computed from "
                         "the ids; next-token logits")


def gemma_f32():
    return _gemma(jnp.float32)


def gemma_bf16():
    return _gemma(jnp.bfloat16)


# --------------------------------------------------------------------------- the registry

SPECS: list[Spec] = [
    Spec("transformers", "resnet", hf_resnet),
    Spec("transformers", "regnet", hf_regnet),
    Spec("transformers", "vit", hf_vit),
    Spec("transformers", "dinov2", hf_dinov2),
    Spec("transformers", "clip-vision", hf_clip_vision),
    Spec("transformers", "bert", hf_bert),
    Spec("transformers", "roberta", hf_roberta),
    Spec("transformers", "distilbert", hf_distilbert),
    Spec("transformers", "gpt2", hf_gpt2),
    Spec("transformers", "llama", hf_llama),
    Spec("keras", "mini-relu-cnn", keras_mini_relu_cnn),
    Spec("keras", "mini-mobile-cnn", keras_mini_mobile_cnn),
    Spec("keras", "resnet50", functools.partial(_keras_app, "ResNet50", relu_cnn=True), slow=True),
    Spec("keras", "vgg16", functools.partial(_keras_app, "VGG16", relu_cnn=True), slow=True),
    Spec("keras", "mobilenetv2", functools.partial(_keras_app, "MobileNetV2"), slow=True),
    Spec("keras", "efficientnetb0", functools.partial(_keras_app, "EfficientNetB0"), slow=True),
    Spec("keras", "densenet121", functools.partial(_keras_app, "DenseNet121", relu_cnn=True), slow=True),
    Spec("keras", "convnext-tiny", functools.partial(_keras_app, "ConvNeXtTiny"), slow=True),
    Spec("jimm", "vit", jimm_vit),
    Spec("jimm", "dinov2", jimm_dinov2),
    Spec("jimm", "siglip-vision", jimm_siglip_vision),
    Spec("jimm", "clip-text", jimm_clip_text),
    Spec("equimo", "convnext", equimo_convnext),
    Spec("equimo", "vit-registers", equimo_vit_registers),
    Spec("equimo", "mobilenetv3", equimo_mobilenetv3),
    Spec("equimo", "mlla", equimo_mlla),
    Spec("equimo", "vssd", equimo_vssd),
    Spec("equimo", "reduceformer", equimo_reduceformer),
    Spec("penzai", "llama", penzai_llama),
    Spec("penzai", "gemma-like", penzai_gemma_like),
    Spec("penzai", "gpt-neox", penzai_gpt_neox),
    Spec("penzai", "llama-layer-stack", penzai_llama_layer_stack),
    Spec("gemma", "gemma3-f32", gemma_f32),
    Spec("gemma", "gemma3-bf16", gemma_bf16),
]
BY_ID = {f"{s.family}-{s.name}": s for s in SPECS}


@functools.cache
def build(model_id: str) -> ZooModel:
    """Build a zoo model once per process (float32 JAX: x64 off)."""
    spec = BY_ID[model_id]
    with jax.enable_x64(False):
        model = spec.build()
    model.family, model.name = spec.family, spec.name
    return model
