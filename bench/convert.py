"""Flux checkpoint conversion on a synthetic checkpoint of >= 2 GiB: peak host memory and speed.

A BFL-format bf16 checkpoint of a Flux-shaped model (hidden 1536, 6 double + 16 single blocks) is
written streaming with `weights.write_safetensors` (no torch model is ever built), then each
conversion runs in a fresh process so that its peak RSS is its own:

- `flux.convert_file` BFL -> diffusers (streaming re-keying, one block's tensors at a time);
- `flux.load` into bf16 JAX parameters (what `python -m sga_jax.convert flux` does before it
  writes orbax), where the loaded parameters themselves live in host memory on a CPU backend;
- the full `python -m sga_jax.convert flux SRC DST` (fp32 parameters, orbax checkpoint).

    python bench/convert.py [--dir /tmp]

The files are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, peak_rss_mib, write_section  # noqa: E402

SYNTHETIC = dict(
    in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=1536, num_heads=12,
    depth=6, depth_single_blocks=16, axes_dim=(16, 56, 56), guidance_embed=True,
)
MIB = 2**20


def current_rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def generate(path: Path) -> dict:
    """Write the synthetic BFL checkpoint tensor by tensor (bf16, N(0, 0.02))."""
    import ml_dtypes
    from flax import nnx

    from sga_jax import weights as W
    from sga_jax.models import flux

    config = flux.FluxConfig(**SYNTHETIC)
    abstract = nnx.state(flux.abstract_model(config), nnx.Param)
    key_map = flux.bfl_key_map(config)
    specs = W.export_specs(abstract, key_map, ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)

    def tensors():
        for key, (shape, dtype) in specs.items():
            yield key, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    start = time.perf_counter()
    W.write_safetensors(path, specs, tensors())
    return {"seconds": time.perf_counter() - start, "params": flux.param_count(config)}


def run_step(step: str, src: Path, dst: Path) -> dict:
    """One measured conversion in this process."""
    import jax
    from flax import nnx

    from sga_jax.models import flux

    jax.devices()  # initialise the backend before the baseline
    baseline = current_rss_mib()
    start = time.perf_counter()
    model_mib = 0.0
    if step == "convert_file":
        flux.convert_file(src, dst, "diffusers")
    elif step == "load":
        model = flux.load(src, param_dtype="bfloat16", dtype="bfloat16")
        model_mib = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / MIB
    elif step == "cli":
        from sga_jax import convert

        convert.main(["flux", str(src), str(dst)])
        model_mib = 4 * flux.param_count(flux.infer_config(src)) / MIB  # the fp32 parameters it held
    else:
        raise ValueError(f"unknown step {step!r}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline_mib": baseline, "peak_mib": peak_rss_mib(), "model_mib": model_mib}


def child(step: str, src: Path, dst: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--step", step, "--src", str(src), "--dst", str(dst)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the temporary files")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        result = generate(Path(args.dst)) if args.step == "generate" else run_step(args.step, Path(args.src), Path(args.dst))
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="sga-flux-convert-", dir=args.dir))
    try:
        src = work / "flux-synthetic.safetensors"
        generated = child("generate", src, src)
        file_mib = src.stat().st_size / MIB
        rows, record = [], {"file_mib": file_mib, "params": generated["params"], "generate_s": generated["seconds"]}
        steps = [
            ("convert_file", work / "diffusers", "flux.convert_file BFL -> diffusers (streaming)"),
            ("load", work / "unused", "flux.load -> bf16 JAX params"),
            ("cli", work / "orbax", "python -m sga_jax.convert flux (fp32 params -> orbax)"),
        ]
        for step, dst, label in steps:
            result = child(step, src, dst)
            record[step] = result
            extra = result["peak_mib"] - result["baseline_mib"] - result["model_mib"]
            rows.append({
                "conversion": label,
                "seconds": result["seconds"],
                "MB/s": file_mib * MIB / 1e6 / result["seconds"],
                "peak RSS MiB": result["peak_mib"],
                "peak RSS / file": result["peak_mib"] / file_mib,
                "(peak - start - params) / file": extra / file_mib,
            })
            shutil.rmtree(dst, ignore_errors=True)
        body = (
            f"Synthetic BFL-format checkpoint: {generated['params'] / 1e9:.2f} B parameters in bf16, one file of "
            f"{file_mib:.0f} MiB, written streaming in {generated['seconds']:.0f} s. Each conversion runs in its own "
            "process; RSS includes the Python/JAX start-up (`start`, ~0.3-0.5 GiB). On a CPU backend the loaded "
            "parameters are host memory, so `flux.load` cannot go below params / file; the last column is the "
            "converter's own overhead beyond the start-up and the parameters it holds (for the CLI: fp32 "
            "parameters, twice the bf16 file, plus the buffers orbax holds while it saves). The CPU and disk are "
            "shared with other agents' jobs.\n\n" + markdown_table(rows)
        )
        write_section("convert", "Flux checkpoint conversion (>= 2 GiB synthetic)", body, record)
        print(markdown_table(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
