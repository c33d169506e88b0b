"""The paper's priors at the paper's settings on one GPU: FoundationEncoder forward time and
agreement, our JAX ports against transformers' PyTorch models with the same random weights.

DINOv2-B/14 (448 px), DINOv3-B/16 (512 px) and SAM2 Hiera B+ (1024 px), i.e. a 32-token long edge,
for 1024 x 1024 images in [-1, 1]. Agreement: last features of JAX float32 (matmuls at full
precision) against PyTorch float32 (TF32 off) on the same preprocessed pixels; bf16 against
float32; cuDNN attention against XLA's. Time: jitted encoder forward (resize + normalise + prior)
in bf16 with XLA and cuDNN attention, against the PyTorch model in bf16 (SDPA) on pixels already
resized. Needs a GPU; writes its own section of docs/benchmarks.md.

python bench/encoders_gpu.py [--batch 8] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, median_time, write_section  # noqa: E402
from sga_jax.encoders import FoundationEncoder  # noqa: E402
from sga_jax.models import dinov2, dinov3, sam2  # noqa: E402

PRIORS = {
    "DINOv2-B/14": ("dinov2", dinov2, lambda: transformers.Dinov2Model(transformers.Dinov2Config(image_size=518))),
    "DINOv3-B/16": (
        "dinov3",
        dinov3,
        lambda: transformers.DINOv3ViTModel(
            transformers.DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_register_tokens=4)
        ),
    ),
    "SAM2 Hiera B+": (
        "sam2",
        sam2,
        lambda: transformers.Sam2HieraDetModel(
            transformers.Sam2HieraDetConfig(
                hidden_size=112, num_attention_heads=2, blocks_per_stage=[2, 3, 16, 3],
                embed_dim_per_stage=[112, 224, 448, 896], num_attention_heads_per_stage=[2, 4, 8, 16],
                window_size_per_stage=[8, 4, 14, 7], global_attention_blocks=[12, 16, 20],
                window_positional_embedding_background_size=[14, 14],
            )
        ),
    ),
}


SMOKE = {
    "DINOv2-B/14": lambda: transformers.Dinov2Model(
        transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    ),
    "DINOv3-B/16": lambda: transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4)
    ),
    "SAM2 Hiera B+": lambda: transformers.Sam2HieraDetModel(
        transformers.Sam2HieraDetConfig(
            hidden_size=16, blocks_per_stage=[1, 2, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
            num_attention_heads_per_stage=[1, 2, 2, 4], window_size_per_stage=[8, 4, 4, 2], global_attention_blocks=[4],
        )
    ),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded noise in every parameter (norm scales and layer scales around 1)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            around_one = ("norm" in name and name.endswith("weight")) or name.endswith("lambda1")
            param.copy_(noise + 1.0 if around_one else noise)
    return model.eval()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def torch_time(fn, repeats: int) -> float:
    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return median_time(run, repeats=repeats, warmup=2)


def bench_one(name: str, batch: int, repeats: int, side: int, long_edge: int, smoke: bool) -> dict:
    kind, family, build = PRIORS[name]
    reference = randomize(SMOKE[name]() if smoke else build())
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp, safe_serialization=True)
        exact = FoundationEncoder(kind, family.load(tmp), long_edge=long_edge)
        fast = FoundationEncoder.from_pretrained(kind, tmp, long_edge=long_edge)
        fused = FoundationEncoder(
            kind, family.load(tmp, dtype="bfloat16", param_dtype="bfloat16", attention="cudnn"), long_edge=long_edge
        )
    images = jax.random.uniform(jax.random.key(0), (batch, side, side, 3), minval=-1.0, maxval=1.0)
    forward = jax.jit(lambda encoder, x: encoder(x))
    pixels = np.asarray(jax.jit(lambda e, x: e.preprocess(x))(exact, images))
    torch_pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(DEVICE)
    reference = reference.to(DEVICE)
    with torch.inference_mode():
        out = reference(pixel_values=torch_pixels).last_hidden_state.float()
    if kind != "sam2":
        prefix = exact.prefix
        out = out[:, prefix:].reshape(batch, *exact.grid(side, side), -1)
    want = out.cpu().numpy()

    with jax.default_matmul_precision("highest"):
        start = time.perf_counter()
        got = np.asarray(forward(exact, images))
        compile_s = time.perf_counter() - start
    got_fast = np.asarray(forward(fast, images).astype(jnp.float32))
    jax_bf16 = median_time(lambda: forward(fast, images).block_until_ready(), repeats=repeats, warmup=2)
    try:
        cudnn_error = rel(np.asarray(forward(fused, images).astype(jnp.float32)), got_fast)
        jax_cudnn = 1e3 * median_time(lambda: forward(fused, images).block_until_ready(), repeats=repeats, warmup=2)
    except Exception as err:  # cuDNN attention is GPU-only and shape-limited: report, keep the rest
        cudnn_error = jax_cudnn = f"failed: {type(err).__name__}"
        print(f"{name}: cudnn attention failed: {err}", flush=True)
    reference = reference.to(torch.bfloat16)
    torch_pixels = torch_pixels.to(torch.bfloat16)
    with torch.inference_mode():
        torch_bf16 = torch_time(lambda: reference(pixel_values=torch_pixels), repeats)
    return {
        "prior": name,
        "input": f"{batch}x{pixels.shape[1]}x{pixels.shape[2]}",
        "grid": "x".join(str(g) for g in got.shape[1:3]),
        "fp32 vs torch": rel(got, want),
        "bf16 vs fp32": rel(got_fast, got),
        "cudnn vs xla (bf16)": cudnn_error,
        "torch bf16 (ms)": 1e3 * torch_bf16,
        "jax bf16 xla (ms)": 1e3 * jax_bf16,
        "jax bf16 cudnn (ms)": jax_cudnn,
        "fp32 compile (s)": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny models and images, any device, no report")
    args = parser.parse_args()
    side, long_edge = (64, 2) if args.smoke else (1024, 32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = jax.devices()[0].device_kind
    rows, failures = [], []
    for name in PRIORS:
        try:
            rows.append(bench_one(name, args.batch, args.repeats, side, long_edge, args.smoke))
            print(rows[-1], flush=True)
        except Exception:  # one prior failing must not lose the others' numbers
            failures.append(f"{name}: {traceback.format_exc().strip().splitlines()[-1]}")
            traceback.print_exc()
    if args.smoke:
        if failures:
            raise SystemExit(f"smoke run failed: {failures}")
        return
    body = (
        f"One {device} ({torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'} for PyTorch {torch.__version__}, transformers "
        f"{transformers.__version__}, jax {jax.__version__}). Random weights shared by both sides; images "
        f"1024 x 1024; median of {args.repeats} runs after two warm-ups. JAX time covers the whole "
        "FoundationEncoder (resize, normalise, prior, token selection); PyTorch time the model alone on "
        "resized pixels. Errors are max |a - b| / max |b| over the output features.\n\n"
        + (markdown_table(rows) if rows else "No prior finished.")
        + ("\n\nFailed: " + "; ".join(failures) if failures else "")
    )
    write_section("encoders_gpu", "Foundation priors at the paper's settings on one GPU", body, {"rows": rows, "failures": failures})


if __name__ == "__main__":
    main()
