"""Flux text encoders: our JAX T5 / CLIP against transformers at realistic widths, on this machine.

1. CLIP ViT-L/14 text tower at its real size (123 M parameters) and a T5 v1.1 encoder at the
   "base" size (12 layers, d_model 768, 110 M parameters; T5-XXL has the same structure at 4096
   wide and 24 deep), random weights saved by transformers and loaded by our streaming converter.
2. For each: load time of our converter (one tensor at a time into device arrays), forward time of our jitted model
   (compilation excluded) and of transformers in fp32 on the same token batch, and the max
   relative error between the two outputs (the parity tests use tiny configs; this checks real
   widths and Flux's lengths).

python bench/text.py [--repeats 3] [--batch 2] [--t5-length 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, median_time, write_section  # noqa: E402
from sga_jax.models import clip, t5  # noqa: E402

T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
               feed_forward_proj="gated-gelu", dropout_rate=0.0)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, eos_token_id=2)


def max_relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def bench_one(name: str, reference: torch.nn.Module, family, ids: np.ndarray, output: str, repeats: int,
              folder: Path) -> dict:
    reference.eval().save_pretrained(folder, safe_serialization=True)
    start = time.perf_counter()
    model = family.load(folder)
    jax.block_until_ready(jax.tree.leaves(model))
    load_s = time.perf_counter() - start
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model))
    forward = jax.jit(lambda m, i: m(i))
    ids_jax = jnp.asarray(ids)
    ours = forward(model, ids_jax)
    ours = ours[1] if output == "pooler_output" else ours
    jax_s = median_time(lambda: jax.block_until_ready(forward(model, ids_jax)), repeats=repeats)
    ids_torch = torch.from_numpy(ids).long()
    with torch.no_grad():
        theirs = getattr(reference(input_ids=ids_torch), output).numpy()
        torch_s = median_time(lambda: reference(input_ids=ids_torch), repeats=repeats)
    return {
        "model": name,
        "params (M)": params / 1e6,
        "tokens": f"{ids.shape[0]} x {ids.shape[1]}",
        "load s": load_s,
        "ours s": jax_s,
        "transformers s": torch_s,
        "ours / transformers": jax_s / torch_s,
        "max rel error": max_relative_error(ours, theirs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--t5-length", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip_ids = rng.integers(0, 49406, size=(args.batch, 77))
        clip_ids[:, 0], clip_ids[:, -1] = 49406, 49407
        rows.append(bench_one("CLIP ViT-L/14 text", transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)),
                              clip, clip_ids, "pooler_output", args.repeats, Path(tmp) / "clip"))
        t5_ids = rng.integers(2, 32000, size=(args.batch, args.t5_length))
        t5_ids[:, -1] = 1
        rows.append(bench_one("T5 v1.1 base encoder", transformers.T5EncoderModel(transformers.T5Config(**T5_BASE)),
                              t5, t5_ids, "last_hidden_state", args.repeats, Path(tmp) / "t5"))
    body = (
        "Random weights saved by transformers (`save_pretrained`), loaded by our streaming converter; "
        "fp32 forward passes on the same token batch, medians of "
        f"{args.repeats} runs (our compile excluded). CLIP output: pooled; T5: last_hidden_state.\n\n"
        + markdown_table(rows)
    )
    write_section("text", "Text encoders: T5 and CLIP forward, load, parity at real widths", body,
                  {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
