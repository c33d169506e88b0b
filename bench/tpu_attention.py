"""Flux's attention on a TPU v5p compiled ahead of time from this host (no TPU needed, libtpu is):
XLA's temporary buffers of one bf16 forward + backward with the Pallas `splash` kernel, `chunked`
and `xla`, at the token counts of 2048 and 4096 px images (F16 VAE) plus 512 text tokens, one
example per chip of a v5p-16 slice (8 chips, batch split over them), Flux.1's 24 heads of 128.

    pip install libtpu==0.0.42.1   # the version jax[tpu]==0.10.2 pins; not into the CPU test venv
    python bench/tpu_attention.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, write_section  # noqa: E402
from sga_jax import parallel  # noqa: E402
from sga_jax.models import nn  # noqa: E402

TOPOLOGY = "v5:2x2x2"  # v5p-16
HEADS, HEAD_DIM, TEXT_TOKENS = 24, 128, 512
IMAGES = (2048, 4096)
IMPLEMENTATIONS = ("splash", "chunked", "xla")


def temporaries(attention: str, tokens: int, devices: list) -> tuple[float, float]:
    """(temporary GiB per chip, compile seconds) of one attention forward + backward."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    rules = parallel.resolve_rules(None)
    x = jax.ShapeDtypeStruct((len(devices), tokens, HEADS, HEAD_DIM), jnp.bfloat16,
                             sharding=parallel.batch_sharding(mesh, rules))

    def grads(q, k, v):
        return jax.grad(lambda *qkv: jnp.sum(nn.attention(*qkv, implementation=attention).astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    start = time.perf_counter()
    with parallel.activation_sharding(mesh, rules):
        compiled = jax.jit(grads).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30, time.perf_counter() - start


def main() -> None:
    devices = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu").devices
    rows, record = [], {}
    for image in IMAGES:
        tokens = (image // 32) ** 2 + TEXT_TOKENS
        row = {"image": f"{image} px ({tokens} tokens)"}
        for attention in IMPLEMENTATIONS:
            try:
                gib, seconds = temporaries(attention, tokens, devices)
                row[f"{attention} temp GiB"] = gib
                record[f"{attention}@{image}"] = {"temp_gib": gib, "compile_s": seconds}
            except Exception as err:  # XLA refuses what exceeds HBM: RESOURCE_EXHAUSTED
                row[f"{attention} temp GiB"] = f"does not compile: {str(err).splitlines()[0][:80]}"
            print(row, flush=True)
        splash, xla = row["splash temp GiB"], row["xla temp GiB"]
        row["xla / splash"] = f"{xla / splash:.0f}x" if isinstance(splash, float) and isinstance(xla, float) else "n/a"
        rows.append(row)
    body = (
        f"{devices[0].device_kind} slice `{TOPOLOGY}` ({len(devices)} chips), compiled ahead of time on this CPU host "
        f"with libtpu (nothing runs). One bf16 attention forward + backward, batch {len(devices)} (one per chip), "
        f"{HEADS} heads x {HEAD_DIM}, XLA's temporary buffers per chip. `splash` is the Pallas kernel "
        "(`attention=\"splash\"`); `chunked` the plain-XLA blockwise form; `xla` keeps the (H, L, L) logits.\n\n"
        + markdown_table(rows)
    )
    write_section("tpu_attention", "Flux attention on TPU v5p (ahead-of-time compile): memory", body, record)


if __name__ == "__main__":
    main()
