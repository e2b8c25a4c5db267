"""Benchmark models in Flax linen (random init, eval mode): VGG-16, ResNet-18 with BatchNorm, an MLP, a small
transformer encoder and a ConvNeXt-style net; and Keras 3 applications on the JAX backend (``keras-*``, random
weights, needs ``pip install keras``: the zoo extra). ``build(name, batch)`` returns ``(apply, variables, x)``
with ``apply(variables, x) -> logits``."""
from __future__ import annotations

import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-16 (configuration D): 13 3x3 convs with ReLU, 5 max pools, 3 dense layers (dropout off)."""
    classes: int = 1000
    width: int = 4096

    @nn.compact
    def __call__(self, x):
        for v in VGG16:
            if v == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.relu(nn.Conv(v, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.classes)(x)


class BasicBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        bn = lambda: nn.BatchNorm(use_running_average=True)  # noqa: E731  (eval mode)
        y = nn.relu(bn()(nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)))
        y = bn()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if x.shape != y.shape:
            x = bn()(nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    classes: int = 1000

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
        for i, f in enumerate((64, 128, 256, 512)):
            x = BasicBlock(f, 1 if i == 0 else 2)(x)
            x = BasicBlock(f)(x)
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(1024)(x))
        x = nn.relu(nn.Dense(1024)(x))
        return nn.Dense(10)(x)


class Encoder(nn.Module):
    """Pre-LN transformer encoder on embedded inputs (batch, seq, dim); mean-pooled, 10 classes."""
    layers: int = 4
    dim: int = 128
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(self.layers):
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
            x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
        return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))


class ConvNeXtMini(nn.Module):
    """A small ConvNeXt-style net: 4x4 stride-4 stem, then per stage blocks of depthwise 7x7 conv, LayerNorm,
    dense 4x, GELU, dense, residual add (downsampling 2x2 stride-2 convs between stages), global mean,
    LayerNorm, 10 classes (issue 16: depthwise convolutions)."""
    dims: tuple[int, ...] = (32, 64, 128)
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dims[0], (4, 4), strides=4)(x)
        for i, d in enumerate(self.dims):
            if i:
                x = nn.Conv(d, (2, 2), strides=2)(nn.LayerNorm()(x))
            for _ in range(self.depth):
                h = nn.Conv(d, (7, 7), padding=3, feature_group_count=d)(x)
                x = x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(h))))
        return nn.Dense(10)(nn.LayerNorm()(x.mean(axis=(1, 2))))


def _randomise_bn(variables):
    """Non-trivial BatchNorm statistics, so canonisation is not a no-op."""
    def f(path, v):
        key = jax.random.key(hash(jax.tree_util.keystr(path)) % (2 ** 31))
        name = jax.tree_util.keystr(path)
        if "mean" in name:
            return 0.1 * jax.random.normal(key, v.shape, v.dtype)
        if "var" in name:
            return jax.random.uniform(key, v.shape, v.dtype, 0.5, 1.5)
        return v
    return {**variables, "batch_stats": jax.tree_util.tree_map_with_path(f, variables["batch_stats"])}


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "vgg16-64": (lambda: VGG(), (64, 64, 3)),
    "vgg16-224": (lambda: VGG(), (224, 224, 3)),
    "resnet18-224": (lambda: ResNet18(), (224, 224, 3)),
    "mlp": (lambda: MLP(), (784,)),
    "transformer": (lambda: Encoder(), (64, 128)),
    "convnext-mini-64": (lambda: ConvNeXtMini(), (64, 64, 3)),
}


#: Keras applications (``weights=None``, 64x64 inputs, 10 classes): name -> constructor in keras.applications
KERAS = {"keras-resnet50-64": "ResNet50", "keras-convnext-tiny-64": "ConvNeXtTiny",
         "keras-mobilenetv2-64": "MobileNetV2", "keras-efficientnetb0-64": "EfficientNetB0"}


def _keras_app(ctor_name: str, batch: int):
    """A Keras application as ``apply((trainable, non_trainable), x)`` through ``model.stateless_call``."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    if keras.backend.backend() != "jax":
        raise SystemExit("the keras-* benchmarks need KERAS_BACKEND=jax (set before keras is first imported)")
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, ctor_name)(weights=None, input_shape=(64, 64, 3), classes=10,
                                                   classifier_activation=None)

    def apply(variables, x):
        return model.stateless_call(*variables, x, training=False)[0]

    variables = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    return apply, variables, jax.random.uniform(jax.random.key(0), (batch, 64, 64, 3), jnp.float32)


def build(name: str, batch: int):
    """Return ``(apply, variables, x)`` for model ``name`` and a random batch of ``batch`` inputs."""
    if name in KERAS:
        return _keras_app(KERAS[name], batch)
    make, shape = MODELS[name]
    model = make()
    x = jax.random.normal(jax.random.key(0), (batch, *shape), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])
    if "batch_stats" in variables:
        variables = _randomise_bn(variables)
    return model.apply, variables, x
