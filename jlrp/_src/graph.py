"""A flat view of a jaxpr: call-like sub-jaxprs inlined, values numbered.

Inlining ``jit``, ``custom_jvp_call`` and ``custom_vjp_call`` bodies lets layer patterns match across call
boundaries (``jax.nn.relu`` is a custom_jvp around a jit around ``max``) and gives every call site its own
layers. Dropping the custom derivative rules is intended: LRP defines its own backward pass.
Each node remembers the ``jax.jit`` calls it came from, so that the interpreter can run a jitted block as
one compiled program again (eagerly, a block compiled as a whole rounds differently from op by op).
Control flow (scan, cond) and ``jax.checkpoint`` (remat, whose memory saving must survive) keep their bodies
as sub-graphs of their own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from .depthwise import bind_conv
from .pooling import bind_max_pool

#: Primitives (objects) whose body is inlined, with the parameter holding it.
_INLINE = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr", P.call_p: "call_jaxpr",
           P.custom_jvp_call_p: "call_jaxpr", P.custom_vjp_call_p: "call_jaxpr"}


#: Primitives (objects) bound through a function of jlrp's, ``binder(*operands, rule=..., **params)``: the
#: model's values from the primitive itself with a faster derivative; ``rule=True`` (a rule's computation)
#: may compute the values a faster way too.
BINDERS = {P.reduce_window_max_p: bind_max_pool, P.conv_general_dilated_p: bind_conv}


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a Python or numpy scalar baked into the jaxpr)."""
    val: Any


@dataclasses.dataclass
class Node:
    """One primitive application: ``outputs = prim.bind(*inputs, **params)``."""
    prim: jcore.Primitive
    params: dict
    inputs: list  # value ids (int) or Lit
    outputs: list[int]
    name: str  # module path from the name stack ('' when unknown)
    call: tuple[int, ...] = ()  # the jax.jit calls (instance numbers, outermost first) it was inlined from
    ctx: Any = None  # the equation's tracing context (mesh, compute type, XLA metadata): replayed in it

    def context(self):
        """The context the equation was traced in. A model may switch the mesh (e.g. to Auto axes around an
        embedding lookup): each equation is replayed in its own context, as jax's evaluation of a jaxpr does."""
        return self.ctx.manager if self.ctx is not None else contextlib.nullcontext()

    def bind(self, *vals, dtype=None):
        """Apply the primitive; with ``dtype``, floating operands are cast to it and the result type follows
        (rules compute in at least float32 for bf16/fp16 models). A call with ``dtype`` is a rule's own
        computation, which a binder may do another, faster way (equal up to rounding); without it, the model's
        forward, which a binder computes with the primitive itself."""
        params = self.prim.get_bind_params(self.params)
        if dtype is not None:
            vals = [v.astype(dtype) if jnp.issubdtype(jnp.result_type(v), jnp.inexact) else v for v in
                    (jnp.asarray(v) for v in vals)]
            if "preferred_element_type" in params:
                params = dict(params, preferred_element_type=None)
        binder = BINDERS.get(self.prim)
        with self.context():
            out = self.prim.bind(*vals, **params) if binder is None else binder(*vals, rule=dtype is not None,
                                                                                  **params)
        return list(out) if self.prim.multiple_results else [out]


@dataclasses.dataclass
class Graph:
    nodes: list[Node]
    inputs: list[int]
    outputs: list  # value ids or Lit
    consts: dict[int, Any]  # value id -> constant array (closed-over values)
    avals: dict[int, Any]  # value id -> abstract value

    @functools.cached_property
    def producer(self) -> dict[int, int]:
        """Value id -> index of the node computing it (inputs and constants have none). Derived once per
        graph: the analysis and every rule that reads the graph share it."""
        return {v: i for i, node in enumerate(self.nodes) for v in node.outputs}


def _name_of(eqn, prefix: str) -> str:
    name = str(eqn.source_info.name_stack)
    return "/".join(p for p in (prefix, name) if p)


class _Builder:
    def __init__(self):
        self.nodes: list[Node] = []
        self.consts: dict[int, Any] = {}
        self.avals: dict[int, Any] = {}
        self._next = 0
        self._calls = 0

    def new(self, aval) -> int:
        vid = self._next
        self._next += 1
        self.avals[vid] = aval
        return vid

    def constant(self, val, aval) -> int:
        vid = self.new(aval)
        self.consts[vid] = val
        return vid

    def inline(self, jaxpr: jcore.Jaxpr, consts: list, args: list, prefix: str, call: tuple = ()) -> list:
        env: dict = {}

        def read(atom):
            return Lit(atom.val) if isinstance(atom, jcore.Literal) else env[atom]

        for var, val in zip(jaxpr.constvars, consts):
            env[var] = self.new(var.aval)
            self.consts[env[var]] = val
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            inputs = [read(a) for a in eqn.invars]
            name = _name_of(eqn, prefix)
            body = eqn.params.get(_INLINE.get(eqn.primitive, ""))
            if body is not None:
                if isinstance(body, jcore.ClosedJaxpr):
                    inner, inner_consts = body.jaxpr, list(body.consts)
                else:
                    inner, inner_consts = body, []
                if eqn.primitive is P.jit_p:
                    self._calls += 1
                    inner_call = call + (self._calls,)
                    # a literal argument is a parameter of the jitted program, not a constant XLA folds into
                    # it (jnp.var's correction: var / (n - 0) would become var * (1 / n), an ulp off)
                    inputs = [self.constant(a.val, v.aval) if isinstance(a, Lit) else a
                              for a, v in zip(inputs, inner.invars)]
                else:
                    inner_call = call
                outs = self.inline(inner, inner_consts, inputs, name, inner_call)
            else:
                outs = [self.new(v.aval) for v in eqn.outvars]
                self.nodes.append(Node(eqn.primitive, dict(eqn.params), inputs, outs, name, call, eqn.ctx))
            for var, out in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    env[var] = out
        return [read(a) for a in jaxpr.outvars]


def flatten(closed: jcore.ClosedJaxpr) -> Graph:
    """Inline every call-like sub-jaxpr of ``closed`` into one flat :class:`Graph`."""
    b = _Builder()
    inputs = [b.new(v.aval) for v in closed.jaxpr.invars]
    outputs = b.inline(closed.jaxpr, list(closed.consts), inputs, "")
    return Graph(b.nodes, inputs, outputs, b.consts, b.avals)
