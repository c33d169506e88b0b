"""`python -m sga_jax.evaluate`: the SGA paper's Table 1 or Table 2 for a folder of images.

Images are read as 8-bit RGB. With `--reference`, files paired by name make a reconstruction run
(Table 2; pairs must have the same size); a reference folder sharing no names is the real set of
a generation run's gFID (Table 1). `--size N` first brings every image to N x N (short-side
resize + center crop, as Diffusion-4K's evaluation). The report is written as JSON (`--out`,
default IMAGES/metrics.json) and as the paper's table in Markdown beside it (.md), and printed.
docs/metrics.md says what each number is and where each weight file comes from. Weight paths may
be Hugging Face hub ids where the weights are a save_pretrained folder (--clip, --dinov2).

Examples:
  # Table 1 (generated images): gFID against real images, CLIP score, aesthetics, GLCM, compression ratio
  python -m sga_jax.evaluate --images samples/ --reference real/ --size 2048 \\
      --inception pt_inception-2015-12-05-6726825d.pth --clip clip-vit-base-patch16/ \\
      --aesthetics sac+logos+ava1-l14-linearMSE.pth --aesthetics_clip clip-vit-large-patch14/
  # Table 2 from reconstructions paired by name with their originals
  python -m sga_jax.evaluate --images recon/ --reference originals/ --inception inception.pth \\
      --lpips_vgg vgg16-397923af.pth --lpips_lin vgg.pth
  # Table 2 for a VAE: reconstruct the originals here (tiled when large), then score them
  python -m sga_jax.evaluate --images originals/ --vae ae.safetensors --vae_f16 --inception inception.pth \\
      --lpips_vgg vgg16-397923af.pth --lpips_lin vgg.pth
  # reference statistics once, reused later
  python -m sga_jax.evaluate --images real/ --inception inception.pth --save_stats real.npz
  python -m sga_jax.evaluate --images samples/ --inception inception.pth --reference_stats real.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sga_jax import cli, metrics
from sga_jax.errors import UsageError
from sga_jax.evaluate.run import Networks, Settings, evaluate
from sga_jax.evaluate.tables import markdown
from sga_jax.models import clip, dinov2, inception, lpips
from sga_jax.text import load_tokenizer
from sga_jax.weights import hub
from sga_jax.weights.converted import load_model, resolve_weights


def parser() -> cli.ArgumentParser:
    """The command line's arguments."""
    p = cli.ArgumentParser("python -m sga_jax.evaluate", __doc__)
    p.add_argument("--images", required=True, help="folder of images to score (the originals with --vae)")
    p.add_argument("--reference", help="folder of reference images: originals paired by name, or the real set")
    p.add_argument("--name", help="the table row's Model name (default: the images folder, or the VAE)")
    p.add_argument("--size", type=int, help="bring every image to SIZE x SIZE first (short-side resize + center crop)")
    p.add_argument("--inception", help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth, a "
                                       "safetensors file with its names, or a converted dir): adds gFID / rFID")
    p.add_argument("--fid_protocol", choices=inception.PROTOCOLS, default=inception.DEFAULT_PROTOCOL,
                   help="the Inception input protocol (the default is the paper's)")
    p.add_argument("--vae", help="a VAE (BFL ae.safetensors, diffusers AutoencoderKL, converted dir or hub id): "
                                 "reconstruct --images and report Table 2")
    p.add_argument("--vae_f16", action="store_true", help="run the VAE in its F16 form (Diffusion-4K's SC-VAE)")
    p.add_argument("--reconstructions", help="with --vae: also write the reconstructions as PNG files here")
    p.add_argument("--lpips_vgg", help="LPIPS's VGG16 trunk (torchvision's vgg16-397923af.pth or a safetensors "
                                       "file with its names), or a converted LPIPS dir: adds LPIPS to Table 2")
    p.add_argument("--lpips_lin", help="LPIPS's lin layers (the lpips package's weights/v0.1/vgg.pth)")
    p.add_argument("--dinov2", help="save_pretrained DINOv2 directory or hub id: adds FD-DINOv2")
    p.add_argument("--reference_stats", help=".npz of reference feature statistics (from --save_stats)")
    p.add_argument("--save_stats", help="write the evaluated images' feature statistics to this .npz")
    p.add_argument("--clip", help="save_pretrained CLIPModel directory (or hub id) with its tokenizer: adds CLIP score")
    p.add_argument("--aesthetics", help="the LAION aesthetic predictor (its published .pth or a safetensors "
                                        "file with the same keys): adds its mean score")
    p.add_argument("--aesthetics_clip", help="the CLIPModel directory or hub id (ViT-L/14) the predictor reads")
    p.add_argument("--batch_size", type=int, default=16, help="images per network batch")
    p.add_argument("--out", help="JSON report path (default: IMAGES/metrics.json); the table goes beside it (.md)")
    return p


def _check(args: argparse.Namespace) -> None:
    if (args.save_stats or args.reference_stats) and not (args.inception or args.dinov2):
        raise UsageError("--save_stats and --reference_stats need --inception or --dinov2")
    if bool(args.aesthetics) != bool(args.aesthetics_clip):
        raise UsageError("--aesthetics and --aesthetics_clip go together")
    if args.lpips_lin and not args.lpips_vgg:
        raise UsageError("--lpips_lin needs --lpips_vgg (the trunk)")
    if (args.vae_f16 or args.reconstructions) and not args.vae:
        raise UsageError("--vae_f16 and --reconstructions need --vae")
    if args.vae and (args.reference or args.clip or args.aesthetics or args.dinov2 or args.reference_stats):
        raise UsageError("--vae reports Table 2 of the reconstructions against --images: it takes no --reference, "
                     "--reference_stats, --clip, --aesthetics or --dinov2")


def _networks(args: argparse.Namespace) -> Networks:
    networks = Networks()
    if args.inception:
        networks.inception = load_model("inception", args.inception)
    if args.vae:
        networks.vae = load_model("vae", resolve_weights("vae", args.vae), **({"f16": True} if args.vae_f16 else {}))
    if args.lpips_vgg:
        networks.lpips = lpips.load(args.lpips_vgg, args.lpips_lin)
    if args.dinov2:
        networks.dinov2 = dinov2.load(resolve_weights("dinov2", args.dinov2))
    if args.clip:
        root = hub.resolve(args.clip, hub.CLIP_MODEL)
        networks.clip = (clip.load_clip_model(root), load_tokenizer("clip", root))
    if args.aesthetics:
        networks.aesthetics = (clip.load_clip_model(hub.resolve(args.aesthetics_clip, hub.CLIP_MODEL)),
                               metrics.load_aesthetic_predictor(args.aesthetics))
    return networks


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    _check(args)
    settings = Settings(size=args.size, fid_protocol=args.fid_protocol, batch_size=args.batch_size,
                        reference_stats=Path(args.reference_stats) if args.reference_stats else None,
                        save_stats=Path(args.save_stats) if args.save_stats else None,
                        reconstructions=Path(args.reconstructions) if args.reconstructions else None)
    report = evaluate(args.images, args.reference, _networks(args), settings)
    name = args.name or Path(args.vae if args.vae else args.images).name
    dataset = Path(args.reference if args.reference else args.images).name
    table = markdown(report, name, dataset)
    out = Path(args.out) if args.out else Path(args.images) / "metrics.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(json.dumps(report, indent=2))
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
