"""Foundation priors' forward time: our JAX ports against transformers' PyTorch models, same random
weights, same input, side by side in one run on this machine.

Small configurations so that the CPU finishes in a few minutes: DINOv2-S/14 and DINOv3-S/16 at
224 px, SAM2 Hiera-T at 512 px, batch 2. JAX runs jitted (compile excluded, timed separately);
PyTorch runs under `torch.inference_mode()` in float32.

python bench/encoders.py [--repeats 5] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
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

from bench.report import markdown_table, median_time, peak_rss_mib, write_section  # noqa: E402
from sga_jax.models import dinov2, dinov3, sam2  # noqa: E402

PRIORS = {
    "DINOv2-S/14": dict(
        family=dinov2,
        build=lambda: transformers.Dinov2Model(
            transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518)
        ),
        size=224,
        output=lambda out: out.last_hidden_state,
    ),
    "DINOv3-S/16": dict(
        family=dinov3,
        build=lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(num_register_tokens=4)),
        size=224,
        output=lambda out: out.last_hidden_state,
    ),
    "SAM2 Hiera-T": dict(
        family=sam2,
        build=lambda: transformers.Sam2HieraDetModel(transformers.Sam2HieraDetConfig()),
        size=512,
        output=lambda out: out.last_hidden_state,
    ),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded noise in every parameter (norm scales around 1), so outputs are not trivial."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            param.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def bench_one(name: str, spec: dict, batch: int, repeats: int) -> dict:
    reference = randomize(spec["build"]())
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp, safe_serialization=True)
        ours = spec["family"].load(tmp)
        ours_bf16 = spec["family"].load(tmp, dtype="bfloat16", param_dtype="bfloat16")
    size = spec["size"]
    pixels = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    torch_pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    forward = jax.jit(lambda model, x: model(x))
    x = jnp.asarray(pixels)

    start = time.perf_counter()
    got = forward(ours, x).block_until_ready()
    compile_s = time.perf_counter() - start
    with torch.inference_mode():
        want = spec["output"](reference(pixel_values=torch_pixels)).numpy()
        torch_s = median_time(lambda: reference(pixel_values=torch_pixels), repeats=repeats)
    jax_s = median_time(lambda: forward(ours, x).block_until_ready(), repeats=repeats)
    forward(ours_bf16, x).block_until_ready()
    bf16_s = median_time(lambda: forward(ours_bf16, x).block_until_ready(), repeats=repeats)
    error = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
    params = sum(p.numel() for p in reference.parameters())
    return {
        "prior": name,
        "params (M)": params / 1e6,
        "input": f"{batch}x{size}x{size}",
        "torch fp32 (s)": torch_s,
        "jax fp32 (s)": jax_s,
        "torch / jax": torch_s / jax_s,
        "jax bf16 (s)": bf16_s,
        "jax compile (s)": compile_s,
        "max rel err": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    for name, spec in PRIORS.items():
        rows.append(bench_one(name, spec, args.batch, args.repeats))
        print(rows[-1], flush=True)
    body = (
        "Forward pass of each prior, random weights shared by both sides, float32 unless noted; "
        f"median of {args.repeats} runs after one warm-up; JAX jitted (compile time listed apart), PyTorch "
        f"{torch.__version__} under inference_mode with {torch.get_num_threads()} threads. `max rel err` is "
        "max |JAX - PyTorch| / max |PyTorch| of the fp32 outputs. The machine is shared with other jobs, so "
        "absolute times are noisy; the ratio is measured side by side. 1-minute load average "
        f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores.\n\n"
        + markdown_table(rows)
        + f"\n\nPeak RSS {peak_rss_mib():.0f} MiB."
    )
    write_section("encoders", "Foundation priors: forward time, JAX vs transformers", body, {"rows": rows})


if __name__ == "__main__":
    main()
