"""python -m sga_jax.sample --root FLUX --prompt TEXT [--prompt TEXT ...] --out DIR

Prompts -> PNG files with Flux.1: one image per prompt and an index.jsonl (file, prompt, seed,
size, steps, guidance per line, as `python -m sga_jax.evaluate --clip` reads it). --root is a
Flux.1 folder or hub id (BFL single files or the diffusers layout, with the text encoders and
tokenizers); --transformer swaps in fine-tuned weights (`python -m sga_jax.train.export`, or a
`python -m sga_jax.convert` directory); --lora applies a LoRA (diffusers / PEFT, kohya / ComfyUI
or XLabs layout) at --lora_scale, merged into the weights unless --lora_unmerged.

Examples:
  python -m sga_jax.sample --root FLUX.1-dev --prompt "a red fox in fresh snow" --out samples/
  python -m sga_jax.sample --root black-forest-labs/FLUX.1-dev --transformer flux_sga --vae_f16 \\
      --prompts_file prompts.txt --height 2048 --width 2048 --steps 50 --guidance 7 --out samples/
  python -m sga_jax.sample --root FLUX.1-dev --lora my_style.safetensors --lora_scale 0.8 \\
      --prompt "a lighthouse at dusk" --out samples/
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sga_jax import cli, sample
from sga_jax.errors import UsageError


def parser() -> cli.ArgumentParser:
    """The command line's arguments."""
    p = cli.ArgumentParser("python -m sga_jax.sample", __doc__)
    p.add_argument("--root", required=True, help="a Flux.1 folder or hub id (transformer, VAE, text encoders, tokenizers)")
    p.add_argument("--transformer", help="Flux weights (path or hub id) replacing the folder's, e.g. a fine-tuned export")
    p.add_argument("--vae", help="VAE weights (path or hub id) replacing the folder's")
    p.add_argument("--vae_f16", action="store_true",
                   help="run F8 VAE weights in the F16 form (for models fine-tuned with config.model.vae.f16)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts_file", help="a text file with one prompt per line")
    p.add_argument("--out", required=True, help="directory for the PNG files and index.jsonl")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels")
    p.add_argument("--steps", type=int, help="Euler steps (default: 28 for dev, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance embedding (dev models only)")
    p.add_argument("--seed", type=int, default=0, help="image i starts from noise fold_in(seed, i)")
    p.add_argument("--batch_size", type=int, default=1, help="images per sampling batch")
    p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype of every network")
    p.add_argument("--attention", default="chunked", help="Flux attention: xla | chunked | cudnn")
    p.add_argument("--lora", help="a LoRA file or directory (diffusers / PEFT, kohya / ComfyUI or XLabs layout)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA (multiplies its alpha / rank)")
    p.add_argument("--lora_unmerged", action="store_true",
                   help="keep the LoRA beside the weights instead of merging it into them")
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts_file")
    start = time.perf_counter()
    model, ae, text_encoder = sample.load_flux_folder(args.root, transformer=args.transformer, vae_weights=args.vae,
                                                      vae_f16=args.vae_f16, dtype=args.dtype, attention=args.attention,
                                                      lora=args.lora, lora_scale=args.lora_scale,
                                                      lora_merged=not args.lora_unmerged)
    steps = args.steps or (28 if model.config.guidance_embed else 4)
    batches = sample.generate(model, ae, text_encoder, prompts, height=args.height, width=args.width, steps=steps,
                              guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    record = {"seed": args.seed, "height": args.height, "width": args.width, "steps": steps, "guidance": args.guidance}
    out = sample.write_samples(batches, prompts, args.out, record)
    print(f"wrote {len(prompts)} images to {out} in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
