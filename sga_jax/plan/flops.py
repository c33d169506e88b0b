"""FLOPs and bytes of a traced program, counted from its jaxpr.

XLA's cost analysis counts the body of a loop once (a scan over Flux's 19 + 38 blocks reports
about one block's work) and the CUDA backend reports none when compiling without a device. The
planner counts the matrix-unit work itself, from the program as traced: `dot_general`,
`conv_general_dilated`, cuDNN's fused attention and Pallas kernels (their declared cost estimate,
or else the kernel body's work once per grid point with the call's operands and results as its
bytes: JAX's splash attention declares none), with each scan's body multiplied by its length, the
costliest branch of a `cond`, and every other sub-program (jit, remat, custom derivatives) once.
Elementwise work is not counted: it runs on the vector units and rarely bounds a step of a
transformer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from jax.extend import core as jex_core

# cuDNN flash attention, per (batch, head, query, key, feature): two matmuls forward; the backward
# recomputes the logits and does four more (dV, dP, dQ, dK).
_ATTENTION_FORWARD = 4
_ATTENTION_BACKWARD = 10


@dataclasses.dataclass(frozen=True)
class Cost:
    """Work of a program: `flops` of the counted ops, `bytes` their operands and results occupy
    (a lower bound on memory traffic), `unknown_loops` while loops counted once for want of a trip
    count."""

    flops: float = 0.0
    bytes: float = 0.0
    unknown_loops: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.unknown_loops + other.unknown_loops)

    def times(self, count: float) -> Cost:
        """This cost repeated `count` times (a loop body)."""
        return Cost(self.flops * count, self.bytes * count, self.unknown_loops)


def _nbytes(aval: Any) -> int:
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _io_bytes(eqn: Any) -> int:
    return sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape"))


def _dot_flops(eqn: Any) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _conv_flops(eqn: Any) -> float:
    # Every output element sums over the kernel's input-feature dimension and its window; this
    # holds for feature / batch groups and for the transposed convolutions of the backward pass.
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(out.shape) * rhs.shape[rhs_spec[1]] * window


def _attention_flops(eqn: Any, per_element: int) -> float:
    q, k = eqn.invars[0].aval, eqn.invars[1].aval
    layout = str(eqn.params.get("layout", "BTNH"))
    if layout.endswith("BNTH") or layout == "1":  # (batch, heads, tokens, dim)
        b, h, lq, d = q.shape
        lk = k.shape[2]
    else:  # (batch, tokens, heads, dim)
        b, lq, h, d = q.shape
        lk = k.shape[1]
    return float(per_element) * b * h * lq * lk * d


def jaxpr_cost(jaxpr: Any) -> Cost:
    """The `Cost` of a `Jaxpr` or `ClosedJaxpr` (e.g. `jax.jit(f).trace(*args).jaxpr`)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = Cost()
    for eqn in jaxpr.eqns:
        total = total + _eqn_cost(eqn)
    return total


def _eqn_cost(eqn: Any) -> Cost:
    name = eqn.primitive.name
    params = eqn.params
    if name == "dot_general":
        return Cost(_dot_flops(eqn), _io_bytes(eqn))
    if name == "conv_general_dilated":
        return Cost(_conv_flops(eqn), _io_bytes(eqn))
    if name.startswith("dot_product_attention_fwd"):
        return Cost(_attention_flops(eqn, _ATTENTION_FORWARD), _io_bytes(eqn))
    if name.startswith("dot_product_attention_bwd"):
        return Cost(_attention_flops(eqn, _ATTENTION_BACKWARD), _io_bytes(eqn))
    if name == "pallas_call":
        estimate = params.get("cost_estimate")
        if estimate is not None:
            return Cost(float(estimate.flops), float(estimate.bytes_accessed))
        body = jaxpr_cost(params["jaxpr"])  # on blocks in the kernel's local memory: only its work counts
        return Cost(body.flops * math.prod(params["grid_mapping"].grid), _io_bytes(eqn), body.unknown_loops)
    if name == "scan":
        return jaxpr_cost(params["jaxpr"]).times(params["length"])
    if name == "while":
        body = jaxpr_cost(params["body_jaxpr"]) + jaxpr_cost(params["cond_jaxpr"])
        return body + Cost(unknown_loops=1)
    if name == "cond":
        branches = [jaxpr_cost(b) for b in params["branches"]]
        return max(branches, key=lambda c: c.flops)
    if name == "shard_map":
        mesh = params["mesh"]
        shards = math.prod(mesh.shape[a] for a in params["newly_manual_axes"])
        return jaxpr_cost(params["jaxpr"]).times(shards)
    total = Cost()
    for sub in jex_core.jaxprs_in_params(params):
        total = total + jaxpr_cost(sub)
    return total
