"""python -m sga_jax.convert FAMILY SRC DST [--export FORMAT] [--dtype DTYPE]

Weights both ways. Import (default): SRC is a checkpoint in the family's public format, a local
path or a hub id (Flux: BFL single file or diffusers folder; VAE: BFL `ae.safetensors` or
diffusers AutoencoderKL; DINOv2 / DINOv3 / SAM2 / T5 / CLIP: a Hugging Face `save_pretrained`
folder; LPIPS: torchvision's VGG16 file, with its lin layers from `--lin`, the lpips package's
`weights/v0.1/vgg.pth`). PyTorch pickles (.pth/.bin/...) are read by an allow-listing unpickler
that never runs code from the file. DST becomes a directory holding an orbax checkpoint of the
parameters (`params/`) and `sga_config.json` (family + model config), which training configs,
sampling and export read back with the right shardings.

Export (--export FORMAT): SRC is such a directory (or any checkpoint the family reads) and DST the
safetensors file or directory to write: `--export diffusers` for diffusers, `--export bfl` for
Black Forest Labs' layout.

Examples:
  python -m sga_jax.convert flux black-forest-labs/FLUX.1-dev ckpt/flux      # BFL file of the repo
  python -m sga_jax.convert dinov2 facebook/dinov2-base ckpt/dinov2
  python -m sga_jax.convert flux ckpt/flux flux_diffusers --export diffusers --dtype bfloat16
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from sga_jax import cli
from sga_jax.errors import UsageError
from sga_jax.weights.converted import FAMILIES, export_checkpoint, import_checkpoint

EXTRA_FILES = sorted({name for entry in FAMILIES.values() for name in entry.extra_files})


def parser() -> cli.ArgumentParser:
    """The command line's arguments."""
    p = cli.ArgumentParser("python -m sga_jax.convert", __doc__)
    p.add_argument("family", choices=sorted(FAMILIES), help="model family")
    p.add_argument("src", help="checkpoint to read: a path or hub id (a converted directory with --export)")
    p.add_argument("dst", help="directory to write (the safetensors output with --export)")
    p.add_argument("--export", metavar="FORMAT", help="write SRC as safetensors in FORMAT (flux, vae: diffusers | "
                   "bfl; dinov2, dinov3, sam2: hf; t5: transformers; clip: transformers | hub; lpips: lpips)")
    p.add_argument("--dtype", help="export dtype, e.g. bfloat16 (default: as stored)")
    for name in EXTRA_FILES:
        users = ", ".join(f for f, entry in sorted(FAMILIES.items()) if name in entry.extra_files)
        p.add_argument(f"--{name}", metavar="FILE", help=f"a further checkpoint file of {users} (import only)")
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    extra = {name: getattr(args, name) for name in EXTRA_FILES if getattr(args, name) is not None}
    start = time.perf_counter()
    if args.export:
        if extra:
            raise UsageError(f"--{sorted(extra)[0]} is not an input of an export")
        export_checkpoint(args.family, args.src, args.dst, format=args.export, dtype=args.dtype)
        print(f"exported {args.family} ({args.export}) to {args.dst} in {time.perf_counter() - start:.1f}s")
    else:
        out = import_checkpoint(args.family, args.src, args.dst, **extra)
        print(f"converted {args.family} {args.src} -> {out} in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
