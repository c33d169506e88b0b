"""Flux VAE: speed against diffusers, and the memory of a tiled 4096 x 4096 F16 decode.

1. Encode and decode of one 512 x 512 image with Flux's VAE (real width, random weights), our JAX
   model (AOT-compiled, fp32) against diffusers' AutoencoderKL (PyTorch fp32, `no_grad`), side by
   side in one run; medians of `--repeats`.
2. Decoding a 4096 x 4096 image from an F16 latent (256 x 256 x 16) through `decode_tiled`
   (512 px tiles, 128 px overlap: the config defaults), each in a fresh subprocess that reports
   its peak RSS. At Flux's real width (ch 128) the run is tens of TFLOP (reported), too long for
   this shared 2-core CPU, so it runs at `--width` (default ch 32, same depth and tiling, ~1/16
   of the FLOPs); for the real width, XLA's buffer plan for the compiled tiled decode at 4096
   (compiled, not run) is reported beside the untiled plan.

python bench/vae.py [--repeats 3] [--width 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, median_time, peak_rss_mib, write_section  # noqa: E402
from sga_jax.models import vae  # noqa: E402

MIB = 2**20


def _compiled(model: vae.AutoEncoder, method: str, shape: tuple[int, ...]):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x))
    return fn.lower(state, jax.ShapeDtypeStruct(shape, jnp.float32)).compile(), state


def speed(size: int, repeats: int) -> list[dict]:
    """Encode / decode seconds at `size` px, JAX against diffusers, one image, fp32."""
    import torch
    from diffusers import AutoencoderKL

    config = vae.AutoEncoderConfig.flux()
    torch_model = AutoencoderKL(**vae.diffusers_config(config)).eval()
    model = vae.AutoEncoder(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    latent = rng.normal(size=(1, size // 8, size // 8, 16)).astype(np.float32)
    rows = []
    for name, x, torch_fn in (
        ("encode", image, lambda t: torch_model.encode(t).latent_dist.mean),
        ("decode", latent, lambda t: torch_model.decode(t).sample),
    ):
        compiled, state = _compiled(model, name, x.shape)
        x_jax = jnp.asarray(x)
        jax_s = median_time(lambda: jax.block_until_ready(compiled(state, x_jax)), repeats=repeats)
        x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            torch_s = median_time(lambda: torch_fn(x_torch), repeats=repeats)
        rows.append(
            {
                "op": f"{name} {size}x{size}",
                "jax s": jax_s,
                "diffusers s": torch_s,
                "diffusers / jax": torch_s / jax_s,
            }
        )
        print(rows[-1], flush=True)
    return rows


def tiled_decode_peak(size: int, width: int) -> dict:
    """Run in a subprocess: build an F16 model of `width`, decode_tiled a size x size image."""
    config = vae.AutoEncoderConfig.flux_f16(ch=width)
    model = vae.AutoEncoder(config, rngs=nnx.Rngs(0))
    side = size // config.downsample_factor
    compiled, state = _compiled(model, "decode_tiled", (1, side, side, config.z_channels))
    temp = compiled.memory_analysis().temp_size_in_bytes
    latent = jax.random.normal(jax.random.key(0), (1, side, side, config.z_channels))
    before = peak_rss_mib()
    start = time.perf_counter()
    image = jax.block_until_ready(compiled(state, latent))
    seconds = time.perf_counter() - start
    assert image.shape == (1, size, size, 3) and bool(jnp.isfinite(image).all())
    return {
        "decode": f"F16 tiled, ch {width}, {size}x{size}",
        "tiles": _tile_count(side, config),
        "s": seconds,
        "peak RSS MiB": peak_rss_mib(),
        "peak RSS before decode MiB": before,
        "XLA temp MiB": temp / MIB,
        "output MiB": size * size * 3 * 4 / MIB,
    }


def _tile_count(side: int, config: vae.AutoEncoderConfig) -> int:
    f = config.downsample_factor
    starts, _ = vae.tiling.tile_starts(side, config.tile_size // f, config.tile_overlap // f)
    return len(starts) ** 2


def buffer_plan(size: int) -> list[dict]:
    """XLA's buffer plan (compiled, not run) for F16 decode at Flux's width, tiled and untiled, and
    the FLOPs of the tiled decode (XLA's count for one tile times the number of tiles)."""
    config = vae.AutoEncoderConfig.flux_f16(tile_threshold=None)
    model = nnx.eval_shape(lambda: vae.AutoEncoder(config, rngs=nnx.Rngs(0)))
    side = size // config.downsample_factor
    tile = config.tile_size // config.downsample_factor
    one_tile, _ = _compiled(model, "decode", (1, tile, tile, config.z_channels))
    tiles = _tile_count(side, config)
    tflop = tiles * one_tile.cost_analysis()["flops"] / 1e12
    rows = []
    for method in ("decode_tiled", "decode"):
        compiled, _ = _compiled(model, method, (1, side, side, config.z_channels))
        stats = compiled.memory_analysis()
        rows.append(
            {
                "decode": f"F16 {'tiled' if method == 'decode_tiled' else 'untiled'}, ch 128, {size}x{size}",
                "XLA temp MiB": stats.temp_size_in_bytes / MIB,
                "arguments MiB": stats.argument_size_in_bytes / MIB,
                "output MiB": stats.output_size_in_bytes / MIB,
                "TFLOP": tflop if method == "decode_tiled" else "",
            }
        )
        print(rows[-1], flush=True)
    return rows


def _subprocess(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=32, help="ch of the F16 model run at 4096 (Flux: 128)")
    parser.add_argument("--quick", action="store_true", help="256 px speed test and a 1024 px tiled decode")
    parser.add_argument("--peak", nargs=2, type=int, metavar=("SIZE", "WIDTH"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(tiled_decode_peak(*args.peak)))
        return
    if args.plan:
        print(json.dumps(buffer_plan(args.plan)))
        return

    size, big = (256, 1024) if args.quick else (512, 4096)
    speed_rows = speed(size, args.repeats)
    peak_rows = [_subprocess("--peak", str(s), str(args.width)) for s in (big // 4, big)]
    for row in peak_rows:
        print(row, flush=True)
    plan_rows = _subprocess("--plan", str(big))
    body = "\n\n".join(
        [
            f"Encode / decode of one {size} x {size} image, Flux's VAE at full width (random weights), fp32, "
            "JAX AOT-compiled against diffusers' AutoencoderKL under `torch.no_grad()`; medians of "
            f"{args.repeats} runs after one warm-up. The CPU is shared with other jobs: the ratio, measured "
            "side by side, is the number to read.",
            markdown_table(speed_rows),
            f"Tiled F16 decode (512 px tiles, 128 px overlap), one fresh process each: peak RSS of the whole "
            f"process (Python, JAX, parameters, the compiled program, the float32 output). Run at ch {args.width} "
            "instead of Flux's 128 (same depth and tiling, ~1/16 of the FLOPs), because the full-width 4K decode "
            f"({plan_rows[0]['TFLOP']:.0f} TFLOP, below) does not fit in this shared 2-core CPU's time; the growth "
            "from the 1/4-size run to the full one is the output buffer, not activations.",
            markdown_table(peak_rows),
            f"Flux's full width (ch 128) at {big} x {big}: XLA's buffer plan for the compiled program (compiled, "
            "not run; arguments are the decoder's parameters and the latent). Tiled, the temporaries are one tile's "
            "activations; untiled they grow with the image. TFLOP: XLA's count for one tile times the tiles.",
            markdown_table(plan_rows),
        ]
    )
    write_section("vae", "Flux VAE (bench/vae.py)", body, {"speed": speed_rows, "tiled_peak": peak_rows, "buffer_plan": plan_rows})


if __name__ == "__main__":
    main()
