"""What each primitive is, algebraically, with respect to the values being explained.

Tables are keyed by primitive *objects* (``jax.extend.core.primitives``), never by name strings, so that an
alias, a renamed primitive or a user primitive with a clashing name cannot change the answer. A primitive
JAX does not export publicly (``stack``, ``reshard``, ...) is looked up once, by object, in JAX's own modules;
when a JAX version lacks it, it simply cannot occur.
"""
from __future__ import annotations

import importlib

from jax.extend.core import Primitive
from jax.extend.core import primitives as P


def _public(*names: str) -> frozenset[Primitive]:
    return frozenset(getattr(P, f"{n}_p") for n in names if hasattr(P, f"{n}_p"))


def _internal(*names: str) -> frozenset[Primitive]:
    """Primitives that ``jax.extend`` does not export, found as objects in JAX's internal modules."""
    found = set()
    for module in ("jax._src.lax.lax", "jax._src.pjit", "jax._src.lax.control_flow.loops", "jax._src.ad_util",
                   "jax._src.lax.parallel", "jax._src.dispatch"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found.update(p for n in names if isinstance(p := getattr(mod, f"{n}_p", None), Primitive))
    return frozenset(found)


#: Linear in each operand: one explained operand makes a dense/conv layer, two make a product.
LINEAR = _public("dot_general", "conv_general_dilated")
#: Sums of the explained values (pooling, reductions, cumulative sums): the proportional rule applies.
SUMS = _public("reduce_sum", "reduce_window_sum", "cumsum")
#: Winner-take-all reductions.
MAXES = _public("reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax", "cummin")
#: Full-axis reductions: their outputs are *statistics* of the values they reduce.
REDUCTIONS = _public("reduce_sum", "reduce_max", "reduce_min")
#: The additive stand-in a rule on a max layer propagates through (max pooling treated as sum pooling).
SUM_OF = {getattr(P, f"{a}_p"): getattr(P, f"{b}_p") for a, b in (
    ("reduce_max", "reduce_sum"), ("reduce_min", "reduce_sum"), ("reduce_window_max", "reduce_window_sum"),
    ("reduce_window_min", "reduce_window_sum"), ("cummax", "cumsum"), ("cummin", "cumsum"))}
#: Elementwise steps that are affine in one operand when the others are constants.
AFFINE = _public("add", "sub", "mul", "div", "neg") | _internal("add_any")
ADDITIVE = _public("add", "sub") | _internal("add_any")
#: Elementwise functions (any arity): chains of them form activation regions.
ELEMENTWISE = AFFINE | _public(
    "sign", "floor", "ceil", "round", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos",
    "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt",
    "integer_pow", "pow", "abs", "max", "min", "erf", "erfc", "erf_inv", "lgamma", "digamma", "rem",
    "select_n", "clamp", "atan2", "square", "nextafter", "is_finite")
#: Value-preserving steps (a cast, a copy, a sharding annotation): identities for relevance.
IDENTITY = _public("convert_element_type", "reduce_precision", "copy", "sharding_constraint", "device_put") | \
    _internal("copy", "reshard", "mesh_cast", "optimization_barrier", "layout_constraint")
#: Steps that only reorder axes or insert/drop size-1 axes.
RESHAPES = _public("transpose", "reshape", "squeeze")
#: Routing: every output element is one input element (or a constant). The ordinary VJP routes relevance.
STRUCTURAL = IDENTITY | RESHAPES | _public(
    "broadcast_in_dim", "rev", "slice", "dynamic_slice", "gather", "concatenate", "pad", "dynamic_update_slice",
    "scatter_add", "scatter", "real", "select_n", "max", "min", "clamp") | _internal(
    "split", "stack", "unstack", "tile")
#: Integer and boolean elementwise ops: with STRUCTURAL and ELEMENTWISE, what keeps a value of token ids a
#: value of each token on its own (``ids != pad``, a one-hot, a gather from a table); a cumsum does not.
PER_TOKEN = ELEMENTWISE | STRUCTURAL | _public(
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "population_count", "clz")
CONTROL = _public("scan", "cond", "remat")
NONNEG_PRESERVING = RESHAPES | IDENTITY | _public(
    "broadcast_in_dim", "slice", "dynamic_slice", "gather", "rev", "reduce_max", "reduce_min",
    "reduce_window_max", "reduce_window_min", "reduce_sum", "reduce_window_sum", "cumsum", "cummax", "cummin",
    "pad", "concatenate", "select_n", "add", "mul", "min") | _internal("stack", "tile")
NONNEG_OUTPUT = _public("abs", "exp", "exp2", "logistic", "sqrt", "rsqrt", "square")
STOP_GRADIENT = _public("stop_gradient")
PAD = P.pad_p
MAX = P.max_p
EXP = _public("exp", "exp2")
GATE = _public("logistic")
DIV, SUB, NEG = P.div_p, P.sub_p, P.neg_p
MUL = P.mul_p
INTEGER_POW = P.integer_pow_p
SCAN, COND = P.scan_p, P.cond_p
WHILE = P.while_p
