"""Weights both ways: `python -m sga_jax.convert FAMILY SRC DST [--export FORMAT]`.

Import (default): SRC is a checkpoint in the family's public format (Flux: BFL single file or
diffusers directory; VAE: BFL `ae.safetensors` or diffusers AutoencoderKL; DINOv2/DINOv3/SAM2/T5/
CLIP: a Hugging Face `save_pretrained` directory; LPIPS: torchvision's VGG16 file, with its lin
layers from `--lin`, the lpips package's `weights/v0.1/vgg.pth`). PyTorch pickles (.pth/.bin/...)
are read by an allow-listing unpickler that never runs code from the file. DST becomes a directory
holding an orbax checkpoint of the parameters (`params/`) and `sga_config.json` (family + model config), which
`sga_jax.weights.converted.load_model` and the training configs read back with the right shardings.

Export (`--export FORMAT`): SRC is such a directory (or a training checkpoint's params exported
the same way) and DST the safetensors file or directory to write, e.g. `--export diffusers` so that
diffusers loads the result, or `--export bfl` for Black Forest Labs' layout.
"""

from __future__ import annotations

import argparse
import sys
import time

from sga_jax.weights.converted import FAMILIES, family, load_model, save_converted


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m sga_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("src", help="checkpoint to read (public format, or a converted directory with --export)")
    parser.add_argument("dst", help="directory to write (or the safetensors output with --export)")
    parser.add_argument("--export", metavar="FORMAT", help="write SRC (converted dir) as safetensors in FORMAT")
    parser.add_argument("--dtype", help="export dtype, e.g. bfloat16 (default: as stored)")
    extra_files = sorted({name for entry in FAMILIES.values() for name in entry.extra_files})
    for name in extra_files:
        users = ", ".join(f for f, entry in sorted(FAMILIES.items()) if name in entry.extra_files)
        parser.add_argument(f"--{name}", metavar="FILE", help=f"a further checkpoint file of {users} (import only)")
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in extra_files if getattr(args, name) is not None}
    unused = sorted(set(given) - set(family(args.family).extra_files)) if not args.export else sorted(given)
    if unused:
        parser.error(f"--{unused[0]} is not an input of {'an export' if args.export else args.family + ' import'}")

    start = time.perf_counter()
    module = family(args.family).load_module()
    if args.export:
        model = load_model(args.family, args.src)
        kwargs = {"format": args.export}
        if args.dtype:
            kwargs["dtype"] = args.dtype
        module.save(model, args.dst, **kwargs)
        print(f"exported {args.family} ({args.export}) to {args.dst} in {time.perf_counter() - start:.1f}s")
    else:
        model = module.load(args.src, **given)
        out = save_converted(args.family, model, args.dst)
        print(f"converted {args.family} {args.src} -> {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
