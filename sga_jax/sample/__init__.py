"""Flux sampling: latent packing, position ids, the shifted time schedule, seedable noise, a
jitted Euler loop (one `lax.scan` over the steps) and decoding with the VAE (tiled for large
images). Latents are channels-last (B, h, w, C) as everywhere in sga-jax; packed tokens are
(B, h/2 * w/2, 4C) with features in BFL's (c, dy, dx) order, so the same weights work.

`load_flux_folder`, `generate` and `write_samples` are what `python -m sga_jax.sample` (its
`__main__`) runs: prompts -> PNG files from a Flux.1 folder or hub id.
`load_flux_folder(..., lora=FILE, lora_scale=S)` applies a LoRA in the diffusers / PEFT, kohya
(ComfyUI) or XLabs layout, merged into the weights (default) or run beside them.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from sga_jax.data.transforms import to_pixels
from sga_jax.models import vae
from sga_jax.models.flux import lora as flux_lora
from sga_jax.text import TextEncoder, default_text_config, text_encoder_from_config
from sga_jax.weights import converted, hub

VelocityFn = Callable[..., jax.Array]


def _check_grid(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"latent grid {h} x {w} must have even sides (Flux packs 2 x 2 patches)")


def pack(latents: jax.Array) -> jax.Array:
    """(B, h, w, C) latents -> (B, h/2 * w/2, 4C) tokens, features ordered (c, dy, dx) as BFL."""
    b, h, w, c = latents.shape
    _check_grid(h, w)
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, h, w, C) for a latent grid of h x w."""
    _check_grid(h, w)
    b, n, f = tokens.shape
    if n != (h // 2) * (w // 2) or f % 4:
        raise ValueError(f"tokens {tokens.shape} do not pack a {h} x {w} latent grid")
    x = tokens.reshape(b, h // 2, w // 2, f // 4, 2, 2)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, f // 4)


def image_ids(b: int, h: int, w: int) -> jax.Array:
    """Position ids (0, row, col) of the packed tokens of an h x w latent grid: (b, h/2 * w/2, 3)."""
    _check_grid(h, w)
    rows, cols = jnp.meshgrid(jnp.arange(h // 2), jnp.arange(w // 2), indexing="ij")
    ids = jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1).reshape(1, -1, 3).astype(jnp.float32)
    return jnp.broadcast_to(ids, (b, ids.shape[1], 3))


def text_ids(b: int, length: int) -> jax.Array:
    """Text position ids: all zeros, (b, length, 3)."""
    return jnp.zeros((b, length, 3), jnp.float32)


def latent_shape(height: int, width: int, channels: int = 16, vae_factor: int = 8) -> tuple[int, int, int]:
    """(h, w, C) of the latent of a height x width image for a VAE that downsamples `vae_factor`
    times (8: Flux's F8, 16: the paper's F16), sides rounded up to an even latent grid."""
    step = 2 * vae_factor
    return 2 * math.ceil(height / step), 2 * math.ceil(width / step), channels


def noise(key: jax.Array, b: int, height: int, width: int, channels: int = 16, vae_factor: int = 8) -> jax.Array:
    """Standard normal starting latents for b images of height x width pixels: (b, h, w, C)."""
    return jax.random.normal(key, (b, *latent_shape(height, width, channels, vae_factor)), jnp.float32)


def time_shift(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    """BFL's exponential shift `e^mu / (e^mu + (1/t - 1)^sigma)` (0 at t = 0)."""
    t = np.asarray(t, np.float64)
    with np.errstate(divide="ignore"):
        return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)


def schedule_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu linear in the image token count through (256, base_shift) and (4096, max_shift)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * image_seq_len + base_shift - slope * 256


def time_schedule(
    steps: int, image_seq_len: int, shift: bool = True, base_shift: float = 0.5, max_shift: float = 1.15
) -> np.ndarray:
    """Flux's times from 1 to 0: (steps + 1,) float32, shifted towards 1 for longer sequences."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = np.linspace(1.0, 0.0, steps + 1)
    if shift:
        t = time_shift(schedule_mu(image_seq_len, base_shift, max_shift), 1.0, t)
    return t.astype(np.float32)


def _velocity_fn(model: Any) -> VelocityFn:
    """`fn(params, img, img_ids, txt, txt_ids, t, y, guidance)` from a GraphDef or such a function."""
    if isinstance(model, nnx.GraphDef):
        return lambda params, *args: nnx.merge(model, params)(*args)
    if callable(model):
        return model
    raise TypeError(f"denoise: expected an nnx.GraphDef or a velocity function, got {type(model).__name__}")


@functools.partial(jax.jit, static_argnums=0)
def denoise(
    model: Any,
    params: Any,
    x: jax.Array,
    img_ids: jax.Array,
    txt: jax.Array,
    txt_ids: jax.Array,
    y: jax.Array,
    timesteps: jax.Array,
    guidance: jax.Array | None = None,
) -> jax.Array:
    """Euler integration `x += (t_next - t) * v(x, t)` over `timesteps` (1 -> 0), one lax.scan.

    model: an `nnx.GraphDef` (merged with `params` inside) or a function
    `fn(params, img, img_ids, txt, txt_ids, t, y, guidance) -> velocity`; static, so pass the same
    object to reuse the compiled loop. x: packed noise (B, L, C). timesteps: (steps + 1,).
    guidance: scalar or (B,) guidance strength for dev models, None otherwise.
    """
    velocity = _velocity_fn(model)
    batch = x.shape[0]
    guidance_vec = None if guidance is None else jnp.broadcast_to(jnp.asarray(guidance, x.dtype), (batch,))

    def step(x: jax.Array, times: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        t_cur, t_next = times
        t_vec = jnp.full((batch,), t_cur, x.dtype)
        v = velocity(params, x, img_ids, txt, txt_ids, t_vec, y, guidance_vec)
        return x + (t_next - t_cur) * v.astype(x.dtype), None

    x, _ = jax.lax.scan(step, x, (timesteps[:-1], timesteps[1:]))
    return x


def sample_latents(
    model: nnx.Module,
    txt: jax.Array,
    y: jax.Array,
    *,
    height: int,
    width: int,
    steps: int = 50,
    guidance: float = 3.5,
    key: jax.Array | None = None,
    latents: jax.Array | None = None,
    txt_ids: jax.Array | None = None,
    shift: bool | None = None,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    vae_factor: int = 8,
) -> jax.Array:
    """Sample Flux latents (B, h, w, C) for images of height x width pixels.

    txt (B, L, context_in_dim) and y (B, vec_in_dim) are the T5 and pooled CLIP embeddings.
    Starting noise: `latents` when given, else drawn from `key`. guidance is used by
    guidance-distilled (dev) models only. shift defaults to BFL's choice: on for dev, off for
    schnell (models without a guidance embedding). vae_factor: 8 for Flux's VAE, 16 for F16.
    """
    config = model.config
    b = txt.shape[0]
    if latents is None:
        if key is None:
            raise ValueError("sample_latents: pass a PRNG `key` or starting `latents`")
        latents = noise(key, b, height, width, config.in_channels // 4, vae_factor)
    h, w, c = latents.shape[1:]
    expected = latent_shape(height, width, config.in_channels // 4, vae_factor)
    if (h, w, c) != expected:
        raise ValueError(
            f"latents {latents.shape} do not fit {height} x {width} images for a model with "
            f"{config.in_channels} input channels and a {vae_factor}x VAE (expected (B, *{expected}))"
        )
    x = pack(latents.astype(jnp.float32))
    shift = config.guidance_embed if shift is None else shift
    timesteps = jnp.asarray(time_schedule(steps, x.shape[1], shift, base_shift, max_shift))
    txt_ids = text_ids(b, txt.shape[1]) if txt_ids is None else txt_ids
    graphdef, params = nnx.split(model)
    x = denoise(
        graphdef,
        params,
        x,
        image_ids(b, h, w),
        txt,
        txt_ids,
        y,
        timesteps,
        jnp.float32(guidance) if config.guidance_embed else None,
    )
    return unpack(x, h, w)


@nnx.jit
def decode_images(ae: vae.AutoEncoder, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, C) -> images (B, H, W, 3) in [-1, 1], tiled above the VAE's threshold."""
    return jnp.clip(ae.decode(latents), -1.0, 1.0)


def load_flux_folder(
    root: str | Path,
    *,
    transformer: str | Path | None = None,
    vae_weights: str | Path | None = None,
    vae_f16: bool = False,
    dtype: str = "bfloat16",
    attention: str = "chunked",
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    lora_merged: bool = True,
) -> tuple[nnx.Module, vae.AutoEncoder, TextEncoder]:
    """(Flux transformer, VAE, text encoder) of a Flux.1 folder or hub id (BFL's single files or
    the diffusers layout, text encoders and tokenizers beside them); `transformer` / `vae_weights`
    (paths or hub ids, any format `sga_jax.weights.converted.load_model` reads) replace the
    folder's own, which are then not fetched. `vae_f16` runs F8 VAE weights in the paper's F16
    form, as a stage-2 run with `config.model.vae.f16` did. T5 runs at 512 tokens for
    guidance-distilled (dev) models and 256 otherwise (schnell), as BFL. `lora`: a LoRA file (any
    layout `flux.lora.read` takes) times `lora_scale`, merged into the transformer's weights or,
    with `lora_merged=False`, run beside them."""
    layouts = [hub.FLUX_TEXT] + ([] if transformer else [hub.FLUX]) + ([] if vae_weights else [hub.VAE])
    root = hub.resolve_folder(root, layouts)
    model = converted.load_model("flux", hub.resolve(transformer or root, hub.FLUX),
                                 dtype=dtype, param_dtype=dtype, attention=attention)
    if lora:
        adapters = flux_lora.read(lora, model.config)
        model = (flux_lora.merge if lora_merged else flux_lora.attach)(model, adapters, lora_scale)
    vae_overrides = {"f16": True} if vae_f16 else {}
    ae = converted.load_model("vae", hub.resolve(vae_weights or root, hub.VAE), dtype=dtype, param_dtype=dtype,
                              **vae_overrides)
    text_config = default_text_config()
    text_config.root = str(root)
    text_config.dtype = dtype
    text_config.t5_length = 512 if model.config.guidance_embed else 256
    return model, ae, text_encoder_from_config(text_config)


def generate(
    model: nnx.Module,
    ae: vae.AutoEncoder,
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    *,
    height: int,
    width: int,
    steps: int,
    guidance: float = 3.5,
    seed: int = 0,
    batch_size: int = 1,
) -> Iterator[np.ndarray]:
    """Prompts -> images in [-1, 1], yielded `batch_size` at a time as (n, H, W, 3) arrays (so a
    long prompt list at 4K never sits in memory at once). Image i starts from noise drawn with
    `fold_in(key(seed), i)`, so it does not depend on the batch size."""
    key = jax.random.key(seed)
    factor = ae.config.downsample_factor
    channels = model.config.in_channels // 4
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch", disable=None):
        batch = list(prompts[start : start + batch_size])
        txt, txt_ids, vec = text_encoder(batch)
        latents = jnp.concatenate(
            [noise(jax.random.fold_in(key, start + i), 1, height, width, channels, factor) for i in range(len(batch))]
        )
        latents = sample_latents(model, txt, vec, height=height, width=width, steps=steps, guidance=guidance,
                                 latents=latents, txt_ids=txt_ids, vae_factor=factor)
        yield np.asarray(decode_images(ae, latents))[:, :height, :width]


def image_filename(index: int, prompt: str) -> str:
    """`007-a-red-fox-in-fresh.png`: the prompt's index and its first words."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:5]
    return f"{index:03d}-{'-'.join(words) or 'prompt'}.png"


def write_samples(batches: Iterator[np.ndarray], prompts: Sequence[str], out: str | Path,
                  record: dict[str, Any]) -> Path:
    """Save the images of `batches` (as `generate` yields them) as PNG files in `out`, one per
    prompt (`image_filename`), and `out/index.jsonl` with a line per image as it is written:
    {"file", "prompt", "index", **record}. Returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = (image for batch in batches for image in batch)
    with open(out / "index.jsonl", "w") as index:
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            name = image_filename(i, prompt)
            Image.fromarray(to_pixels(image)).save(out / name)
            index.write(json.dumps({"file": name, "prompt": prompt, "index": i, **record}) + "\n")
            index.flush()
    return out
