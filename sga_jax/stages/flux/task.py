"""Stage 2: SGA fine-tuning of Flux (paper Eq. 8), as a Task for the training engine.

One step: images -> frozen VAE encode (posterior mean, F16 or F8) -> pack -> noise at t
(logit-normal or uniform, optionally Flux's resolution shift) -> Flux forward with the hidden tap
at double block k -> flow-matching loss (velocity MSE) or WLF (Haar sub-band x0 loss) ->
plus lambda * alignment(head(hidden_k), prior(images)). The alignment is SGA (conv head, stride 2,
pooled to the prior's long-edge grid), or for the paper's ablations iREPA or REPA at the same
place, or none (vanilla fine-tuning).

Only Flux and the head train. The VAE, the prior and the text encoders are frozen: they live in
the frozen module (no gradients, no optimizer state, sharded by the same rules) and are loaded from
the weight paths in the config, or randomly initialised when a path is empty (the demo, which says
so). With `config.lora.rank` > 0 Flux trains low-rank adapters only (`nn.lora`): its base weights
are `nn.Frozen` (in `config.lora.base_dtype`), loaded from `config.model.flux.weights` on every
start with the frozen state, so gradients, optimizer state and checkpoints hold the adapters and
the head alone; `export` then writes LoRA files (`lora`: diffusers / PEFT, `lora-kohya`: kohya /
ComfyUI) or the merged model (`diffusers`, `bfl`). Captions are tokenised on the host and encoded inside the step, or read from a caption cache
written by `python -m sga_jax.encode` (`config.data.caption_cache`).

Every `eval_every` steps the feature-drift probe (`sga_jax.stages.probe`, docs/geometry.md)
measures how far the image stream after block k has moved from the pre-trained model's on a fixed
probe batch; the `start` and `evaluate` hooks drive it and the `_probe_*` methods are its taps.

Config: see `configs/flux_sga.py`; the task's own section is `config.model` (the networks and
their weights), `config.objective`, `config.align`, `config.lora`, `config.probe` and `config.sample`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sga_jax import sample
from sga_jax.align import IREPAHead, REPAHead, SGAHead, irepa_loss, repa_loss, sga_loss
from sga_jax.encoders import FoundationEncoder
from sga_jax.errors import ConfigError
from sga_jax.models import clip, flux, nn, t5, vae
from sga_jax.models.flux import lora as flux_lora
from sga_jax.text import encode_tokens, load_tokenizer, resolve_paths, tokenize
from sga_jax.weights import converted
from sga_jax.stages import common, probe
from sga_jax.stages.flux import flow_matching as fm
from sga_jax.train import plots
from sga_jax.train.state import FrozenState

log = logging.getLogger(__name__)

ALIGN_METHODS = ("sga", "irepa", "repa", "none")
OBJECTIVES = ("fm", "wlf")
LORA_FORMATS = {"lora": "diffusers", "lora-kohya": "kohya"}  # export format -> flux.lora layout


@dataclasses.dataclass(frozen=True)
class Networks:
    """Resolved configs of every network of the stage (built once by `configure`)."""

    flux: flux.FluxConfig
    vae: vae.AutoEncoderConfig
    prior_kind: str
    prior: Any
    t5: t5.T5Config | None
    clip: clip.ClipTextConfig | None


class FluxWithHead(nnx.Module):
    """The trainable part: Flux and the alignment head (None for vanilla fine-tuning)."""

    def __init__(self, flux_config: flux.FluxConfig, head: nnx.Module | None, *, rngs: nnx.Rngs):
        self.flux = flux.Flux(flux_config, rngs=rngs)
        self.head = head


class FrozenModels(nnx.Module):
    """The frozen part: the VAE, the prior (None without alignment) and the text encoders (None
    when captions come from a cache)."""

    def __init__(self, ae: vae.AutoEncoder, prior: FoundationEncoder | None, t5_model: Any, clip_model: Any):
        self.vae = ae
        self.prior = prior
        self.t5 = t5_model
        self.clip = clip_model


def _latent_grid(ae_config: vae.AutoEncoderConfig, height: int, width: int) -> tuple[int, int]:
    factor = ae_config.downsample_factor
    if height % (2 * factor) or width % (2 * factor):
        raise ConfigError(
            f"image {height}x{width} must be a multiple of {2 * factor} px (VAE factor {factor} x Flux's 2x2 packing); "
            "set config.data.buckets.multiple accordingly"
        )
    return height // factor, width // factor


class FluxSGATask:
    """The diffusion stage: see the module docstring. Registered as task "flux_sga"."""

    images_per_example = 1

    def configure(self, config: ml_collections.ConfigDict) -> None:
        """Resolve and check every network config before anything compiles."""
        m = config.model
        compute = config.precision.compute_dtype
        flux_config = dataclasses.replace(common.model_config(m.flux, flux.FluxConfig, "flux"), dtype=compute,
                                          param_dtype="float32", remat=m.flux.get("remat", "none"),
                                          attention=m.get("attention", "chunked"),
                                          splash_block_sizes=nn.SplashBlockSizes(**m.get("splash_block_sizes", {})))
        lora = config.get("lora")
        if lora is not None and int(lora.rank) > 0:
            adapters = nn.LoRAConfig(rank=int(lora.rank), alpha=float(lora.alpha) or None, dropout=float(lora.dropout),
                                     targets=tuple(lora.targets))
            flux_config = dataclasses.replace(flux_config, param_dtype=lora.base_dtype, lora=adapters)
        frozen_dtype = m.get("frozen_dtype", "float32")
        vae_config = dataclasses.replace(common.model_config(m.vae, vae.AutoEncoderConfig, "vae"),
                                         dtype=frozen_dtype, param_dtype=frozen_dtype, f16=m.vae.f16)
        probing = probe.is_enabled(config)  # the probe measures the prior's structure in vanilla runs too
        prior_kind, prior_config = common.prior_config(m.prior, frozen_dtype,
                                                       needed=config.align.method != "none" or probing)
        t5_config = clip_config = None
        self.text_paths = resolve_paths(config.text) if not config.data.caption_cache else None
        if self.text_paths is not None:
            text_dtype = {"dtype": config.text.dtype, "param_dtype": config.text.dtype}
            t5_config = t5.T5Config.from_hf_config(_hf_config(self.text_paths["t5"]), **text_dtype)
            clip_config = clip.ClipTextConfig.from_hf_config(_hf_config(self.text_paths["clip"]), **text_dtype)
            if t5_config.d_model != flux_config.context_in_dim:
                raise ConfigError(f"T5 width {t5_config.d_model} != Flux context_in_dim {flux_config.context_in_dim}")
            if clip_config.hidden_size != flux_config.vec_in_dim:
                raise ConfigError(f"CLIP width {clip_config.hidden_size} != Flux vec_in_dim {flux_config.vec_in_dim}")
        if vae_config.z_channels * 4 != flux_config.in_channels:
            raise ConfigError(
                f"VAE latent channels {vae_config.z_channels} x 4 (2x2 packing) != Flux in_channels {flux_config.in_channels}"
            )
        align = config.align
        if align.method not in ALIGN_METHODS:
            raise ConfigError(f"config.align.method={align.method!r}: expected one of {ALIGN_METHODS}")
        if (align.method != "none" or probing) and not 0 <= align.block < flux_config.depth:
            raise ConfigError(f"config.align.block={align.block}: Flux has {flux_config.depth} double blocks")
        if config.objective.kind not in OBJECTIVES:
            raise ConfigError(f"config.objective.kind={config.objective.kind!r}: expected one of {OBJECTIVES}")
        self.config = config
        self.networks = Networks(flux_config, vae_config, prior_kind, prior_config, t5_config, clip_config)
        self.probe = None
        if probing:
            taps = probe.Taps(examples=self._probe_examples, prepare=self._probe_prepare, tap=self._probe_tap)
            self.probe = probe.FeatureProbe(config.probe, taps)

    def _head(self, rngs: nnx.Rngs) -> nnx.Module | None:
        align, nets = self.config.align, self.networks
        if align.method == "none":
            return None
        hidden = nets.flux.hidden_size
        prior_dim = nets.prior.embed_dim_per_stage[-1] if nets.prior_kind == "sam2" else nets.prior.hidden_size
        if align.method == "sga":
            return SGAHead(hidden, prior_dim, kernel_size=align.head_kernel, stride=align.head_stride, rngs=rngs)
        if align.method == "irepa":
            return IREPAHead(hidden, prior_dim, kernel_size=align.irepa_kernel, rngs=rngs)
        return REPAHead(hidden, prior_dim, hidden=align.repa_hidden, rngs=rngs)

    def _frozen(self, rngs: nnx.Rngs) -> FrozenModels:
        nets = self.networks
        prior = None
        if self.config.align.method != "none" or self.probe is not None:  # the probe measures vanilla runs too
            prior_model = common.PRIOR_MODELS[nets.prior_kind][1](nets.prior, rngs=rngs)
            prior = FoundationEncoder(nets.prior_kind, prior_model, long_edge=self.config.align.long_edge)
        t5_model = t5.T5EncoderModel(nets.t5, rngs=rngs) if nets.t5 is not None else None
        clip_model = clip.ClipTextModel(nets.clip, rngs=rngs) if nets.clip is not None else None
        return FrozenModels(vae.AutoEncoder(nets.vae, rngs=rngs), prior, t5_model, clip_model)

    def build(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> tuple[FluxWithHead, FrozenModels]:
        """(trainable Flux + head, frozen VAE / prior / text encoders), randomly initialised."""
        return FluxWithHead(self.networks.flux, self._head(rngs), rngs=rngs), self._frozen(rngs)

    @property
    def lora(self) -> bool:
        """Whether Flux trains LoRA adapters only (`config.lora.rank` > 0)."""
        return self.networks.flux.lora is not None

    def load_pretrained(self, params: dict, shardings: dict) -> dict:
        """Replace the random Flux parameters with `config.model.flux.weights` when it is set (a LoRA
        run's adapters keep their start, B = 0; its base weights load with the frozen state)."""
        if self.lora:
            return params
        path = common.weights_path(self.config.model.flux, "flux")
        if path is None:
            log.warning("config.model.flux.weights is empty: Flux starts from RANDOM weights")
            return params
        return {**params, "flux": self._flux_weights(path, shardings["flux"], "float32")}

    def _flux_weights(self, path: str, shardings: dict | None, param_dtype: str) -> dict:
        """The pure dict of a Flux checkpoint's weights (any format `converted.load_model` reads)."""
        model = converted.load_model("flux", path, shardings=shardings, dtype=self.networks.flux.dtype,
                                     param_dtype=param_dtype, remat=self.networks.flux.remat)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def load_frozen(self, abstract: FrozenState, shardings: FrozenState) -> FrozenState:
        """Frozen weights from their paths, each streamed into its shardings; parts without a path
        are randomly initialised from the seed (only those: XLA drops the others' initialisers). A
        LoRA run's base Flux (`abstract.trainable["flux"]`) is one more part, from `config.model.flux.weights`."""
        m = self.config.model
        paths = {"vae": common.weights_path(m.vae, "vae")}
        if abstract.module.get("prior") is not None:
            paths["prior"] = common.weights_path(m.prior, self.networks.prior_kind)
        if self.text_paths is not None:
            paths["t5"], paths["clip"] = self.text_paths["t5"], self.text_paths["clip"]
        if self.lora:
            paths["flux"] = common.weights_path(m.flux, "flux")

        def part_shardings(name: str) -> dict:
            return shardings.trainable[name] if name == "flux" else shardings.module[name]

        def init_random(key: jax.Array) -> dict:
            rngs = nn.construction_rngs(key)
            full = nnx.to_pure_dict(nnx.split(self._frozen(rngs))[1])
            if self.lora:
                full["flux"] = nnx.to_pure_dict(nnx.state(flux.Flux(self.networks.flux, rngs=rngs), nn.Frozen))
            return full

        loaded = common.load_frozen_parts(paths, part_shardings, self._load_frozen_part, init_random,
                                          int(self.config.seed))
        trainable = {"flux": loaded.pop("flux")} if self.lora else {}
        return FrozenState(trainable=trainable, module={name: loaded.get(name) for name in abstract.module})

    def _load_frozen_part(self, name: str, path: Path, shardings: dict) -> dict:
        """One frozen network's variables from `path` (public format or converted directory)."""
        if name == "flux":
            return self._flux_weights(path, shardings, self.networks.flux.param_dtype)
        dtype = self.config.text.dtype if name in ("t5", "clip") else self.config.model.get("frozen_dtype", "float32")
        overrides = {"dtype": dtype, "param_dtype": dtype}
        if name == "vae":
            overrides["f16"] = self.networks.vae.f16  # F8 weights run in the F16 form (no new parameters)
        if name == "prior":
            model = converted.load_model(self.networks.prior_kind, path, shardings=shardings["model"], **overrides)
            return {"model": nnx.to_pure_dict(nnx.state(model))}
        return nnx.to_pure_dict(nnx.state(converted.load_model(name, path, shardings=shardings, **overrides)))

    def loss(self, trainable: FluxWithHead, frozen: FrozenModels, batch: dict, rng: jax.Array, *,
             step: jax.Array | None = None):
        """Flow matching (or WLF) + lambda * alignment; metrics keep the two terms apart (every
        term is on from the first step)."""
        config = self.config
        images = batch["image"]
        b, height, width, _ = images.shape
        h, w = _latent_grid(self.networks.vae, height, width)
        latents = jax.lax.stop_gradient(frozen.vae.encode(images).astype(jnp.float32))
        x0 = sample.pack(latents)
        ids = sample.image_ids(b, h, w)
        t_key, n_key = jax.random.split(rng)
        t = self._timesteps(t_key, b, x0.shape[1])
        x_t, target = fm.noisy_sample(x0, jax.random.normal(n_key, x0.shape, jnp.float32), t)
        txt, txt_ids, vec = self._text(frozen, batch)
        method = config.align.method
        tap = None if method == "none" else int(config.align.block)
        with nn.dropout_rng(jax.random.fold_in(rng, 2)):  # adapter dropout (LoRA runs with config.lora.dropout)
            out = trainable.flux(x_t, ids, txt, txt_ids, t, vec, self._guidance(b), hidden_block=tap)
        velocity, hidden = (out, None) if tap is None else out
        velocity = velocity.astype(jnp.float32)
        weights = common.example_weights(batch, b)
        if config.objective.kind == "wlf":
            x0_pred = sample.unpack(fm.predicted_x0(x_t, velocity, t), h, w)
            main = jnp.sum(weights * fm.wavelet_loss(x0_pred, latents, config.objective.wlf_weights))
        else:
            main = jnp.sum(weights * fm.velocity_mse(velocity, target))
        metrics = {"loss_fm": main, "t_mean": jnp.mean(t)}
        if method == "none":
            return main, metrics
        align = jnp.sum(weights * self._alignment(trainable.head, frozen.prior, hidden, images, (h // 2, w // 2)))
        metrics[f"loss_{method}"] = align
        return main + config.align.weight * align, metrics

    def _timesteps(self, rng: jax.Array, batch: int, tokens: int) -> jax.Array:
        """Training times (B,) as `config.objective` samples them (shifted for `tokens` image tokens)."""
        objective = self.config.objective
        t = fm.sample_timesteps(rng, batch, kind=objective.timesteps, mean=objective.logit_mean, std=objective.logit_std)
        return fm.shift_timesteps(t, sample.schedule_mu(tokens)) if objective.shift else t

    def _guidance(self, batch: int) -> jax.Array | None:
        return jnp.full((batch,), self.config.guidance, jnp.float32) if self.networks.flux.guidance_embed else None

    def _alignment(self, head: nnx.Module, prior: FoundationEncoder, hidden: jax.Array, images: jax.Array,
                   hidden_grid: tuple[int, int]) -> jax.Array:
        """Per-example alignment loss (B,) between head(hidden) and the prior's tokens."""
        ref = prior(images)
        b, gh, gw, c = ref.shape
        ref = ref.reshape(b, gh * gw, c).astype(jnp.float32)
        gen, _ = head(hidden, hidden_grid, out_grid=(gh, gw))
        gen = gen.astype(jnp.float32)
        align = self.config.align
        loss_fn = {
            "sga": functools.partial(sga_loss, method=align.sga_method),
            "irepa": functools.partial(irepa_loss, alpha=align.irepa_alpha),
            "repa": repa_loss,
        }[align.method]
        return common.per_example(loss_fn, gen, ref)

    def _text(self, frozen: FrozenModels, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        if "txt" in batch:
            txt = batch["txt"].astype(jnp.float32)
            return txt, jnp.zeros((*txt.shape[:2], 3), jnp.float32), batch["vec"].astype(jnp.float32)
        txt, txt_ids, vec = encode_tokens(frozen.t5, frozen.clip, batch, mask_t5=self.config.text.mask_t5)
        return jax.lax.stop_gradient(txt.astype(jnp.float32)), txt_ids, jax.lax.stop_gradient(vec.astype(jnp.float32))

    def start(self, trainable: FluxWithHead, frozen: FrozenModels, step: int, workdir: str, rng: jax.Array):
        """The feature-drift probe's start: record the pre-trained tap (fresh start) or read it back."""
        return None if self.probe is None else self.probe.start(trainable, frozen, step, workdir, rng)

    def evaluate(self, trainable: FluxWithHead, frozen: FrozenModels, step: int, workdir: str,
                 rng: jax.Array) -> dict[str, float]:
        """The feature-drift probe's numbers (`sga_jax.stages.probe.METRICS`) at this step."""
        return {} if self.probe is None else self.probe.measure(trainable)

    def _probe_examples(self, rng: jax.Array) -> dict[str, np.ndarray]:
        """`config.probe.batch_size` images and captions from the data (the run's seed picks them;
        filler slots dropped), tokenised or with their cached embeddings, and the noise (on the
        latent grid) and timesteps (as training samples them) the probe uses at every evaluation."""
        config = self.config
        examples = common.probe_examples(config)
        if self.text_paths is not None:
            examples.update(tokenize_captions(_tokenizers(self.text_paths), config.text, list(examples["caption"])))
        b, height, width, _ = examples["image"].shape
        h, w = _latent_grid(self.networks.vae, height, width)
        t_key, n_key = jax.random.split(rng)
        examples["t"] = np.asarray(self._timesteps(t_key, b, (h // 2) * (w // 2)))
        examples["noise"] = np.asarray(jax.random.normal(n_key, (b, h, w, self.networks.vae.z_channels), jnp.float32))
        return examples

    def _probe_prepare(self, frozen: FrozenModels, examples: dict) -> tuple[dict, jax.Array]:
        """Frozen part of the probe: noisy latents x_t on the latent grid, the text conditioning and
        the prior's tokens of the probe images."""
        images = examples["image"]
        latents = frozen.vae.encode(images).astype(jnp.float32)
        x_t, _ = fm.noisy_sample(latents, examples["noise"], examples["t"])
        txt, txt_ids, vec = self._text(frozen, examples)
        inputs = {"x_t": x_t, "t": examples["t"], "txt": txt, "txt_ids": txt_ids, "vec": vec}
        return inputs, frozen.prior(images)

    def _probe_tap(self, trainable: FluxWithHead, inputs: dict) -> tuple[jax.Array, jax.Array]:
        """Flux on the probe inputs: the image stream after double block `config.align.block` (before
        the head) on its (h/2, w/2) token grid, and the velocity."""
        x_t = inputs["x_t"]
        b, h, w, _ = x_t.shape
        velocity, hidden = trainable.flux(sample.pack(x_t), sample.image_ids(b, h, w), inputs["txt"], inputs["txt_ids"],
                                          inputs["t"], inputs["vec"], self._guidance(b),
                                          hidden_block=int(self.config.align.block))
        return hidden.reshape(b, h // 2, w // 2, hidden.shape[-1]), velocity

    @property
    def export_formats(self) -> tuple[str, ...]:
        """Flux in diffusers' or BFL's layout; a LoRA run also its adapters as LoRA files."""
        return ("diffusers", "bfl") + (tuple(LORA_FORMATS) if self.lora else ())

    def export(self, read: Callable[[str, Any], dict], out: str | Path, *, format: str, dtype: str | None) -> None:
        """Write the trained Flux (the head is training-only) with `flux.save` in `format`; for a
        LoRA run, `lora` / `lora-kohya` write its adapters (`flux.lora.write`) and `diffusers` /
        `bfl` the base from `config.model.flux.weights` with the adapters merged in."""
        graphdef, weights, base = nnx.split(flux.abstract_model(self.networks.flux), nnx.Param, nn.Frozen)
        nnx.replace_by_pure_dict(weights, read("flux", nnx.to_pure_dict(weights)))
        if format in LORA_FORMATS:
            model = nnx.merge(graphdef, weights, base)  # the base stays abstract: a LoRA file needs the adapters only
            flux_lora.write(flux_lora.from_model(model), model.config, out, LORA_FORMATS[format], dtype=dtype)
            return
        if self.lora:
            path = self.config.model.flux.get("weights", "")
            if not path:
                raise ConfigError("a merged export needs the LoRA's base weights, but this run's "
                                  "config.model.flux.weights is empty (its base was random)")
            nnx.replace_by_pure_dict(base, self._flux_weights(path, None, self.networks.flux.param_dtype))
            model = flux_lora.merged(nnx.merge(graphdef, weights, base))
        else:
            model = nnx.merge(graphdef, weights, base)
        flux.save(model, out, format=format, dtype=dtype)

    plan_levers = {"remat": "model.flux.remat", "attention": "model.attention"}

    def batch_shapes(self, config: ml_collections.ConfigDict, bucket: tuple[int, int] | None) -> dict:
        """Global shapes of the arrays `batches` yields for a (width, height) bucket: images in
        [-1, 1], the padding mask, and token ids (or the caption cache's embeddings)."""
        if bucket is None:
            raise ValueError("flux_sga batches come in aspect buckets: give a (width, height)")
        width, height = bucket
        _latent_grid(self.networks.vae, height, width)
        b, text, sds = int(config.batch_size), config.text, jax.ShapeDtypeStruct
        shapes = {"image": sds((b, height, width, 3), jnp.float32), "valid": sds((b,), jnp.bool_)}
        if config.data.caption_cache:  # the arrays `python -m sga_jax.encode` stored, in its dtype
            flux_config = self.networks.flux
            shapes["txt"] = sds((b, text.t5_length, flux_config.context_in_dim), jnp.dtype(text.dtype))
            shapes["vec"] = sds((b, flux_config.vec_in_dim), jnp.dtype(text.dtype))
        else:
            shapes.update({name: sds((b, length), jnp.int32) for name, length in
                           (("t5_ids", text.t5_length), ("t5_mask", text.t5_length), ("clip_ids", text.clip_length))})
        return shapes

    def batches(self, config: ml_collections.ConfigDict, mesh: Mesh, *, seed: int) -> "StageBatches":
        """The Grain pipeline of `config.data`, with captions tokenised on the host when encoded on the fly."""
        return StageBatches(config, mesh, seed=seed, text_paths=self.text_paths)

    def sample(self, trainable: FluxWithHead, frozen: FrozenModels, step: int, workdir: str, rng: jax.Array) -> None:
        """Sample `config.sample.prompts` with the Euler sampler, decode with the VAE, save a grid
        (`samples/step_NNNNNN.png`) and redraw the loss curves (`loss_curve.png`)."""
        workdir = Path(workdir)
        plots.loss_curves(workdir / "metrics.jsonl", workdir / "loss_curve.png")
        s = self.config.sample
        if not s.prompts:
            return None
        if frozen.t5 is None:
            log.info("sampling skipped: captions come from a cache and no text encoders are loaded")
            return None
        tokens = tokenize_captions(_tokenizers(self.text_paths), self.config.text, list(s.prompts))
        txt, _, vec = _encode_prompts(frozen.t5, frozen.clip, tokens, self.config.text.mask_t5)
        factor = self.networks.vae.downsample_factor
        latents = sample.sample_latents(trainable.flux, txt, vec, height=s.height, width=s.width, steps=s.steps,
                                        guidance=s.guidance, key=rng, vae_factor=factor)
        images = sample.decode_images(frozen.vae, latents)
        plots.save_grid(np.asarray(images), workdir / "samples" / f"step_{step:06d}.png", captions=list(s.prompts))
        return None


def _hf_config(path: Path) -> dict:
    """The config.json of a save_pretrained directory, with a clear error when it is missing."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: text encoders must be save_pretrained directories")
    return json.loads(file.read_text())


def _tokenizers(paths: dict[str, Path]) -> tuple[Any, Any]:
    return _load_tokenizers(str(paths["t5_tokenizer"]), str(paths["clip_tokenizer"]))


@functools.lru_cache(maxsize=4)
def _load_tokenizers(t5_dir: str, clip_dir: str) -> tuple[Any, Any]:
    return load_tokenizer("t5", t5_dir), load_tokenizer("clip", clip_dir)


def tokenize_captions(tokenizers: tuple[Any, Any], text_config: Any, captions: list[str]) -> dict[str, np.ndarray]:
    """Captions -> {"t5_ids", "t5_mask", "clip_ids"} padded and truncated as Flux does."""
    t5_ids, t5_mask = tokenize(tokenizers[0], captions, text_config.t5_length)
    clip_ids, _ = tokenize(tokenizers[1], captions, text_config.clip_length)
    return {"t5_ids": t5_ids, "t5_mask": t5_mask, "clip_ids": clip_ids}


@nnx.jit(static_argnums=3)
def _encode_prompts(t5_model: Any, clip_model: Any, tokens: dict, mask_t5: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    return encode_tokens(t5_model, clip_model, tokens, mask_t5=mask_t5)


class StageBatches(common.ImageBatches):
    """Batches for the step: images as global arrays, captions tokenised (or cached embeddings)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, seed: int,
                 text_paths: dict[str, Path] | None):
        super().__init__(config, mesh, seed=seed)
        self.tokenizers = None if text_paths is None else _tokenizers(text_paths)

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tokenise the captions (unless they come from a cache)."""
        if self.tokenizers is not None:
            captions = [str(c) for c in batch["caption"]]
            batch.update(tokenize_captions(self.tokenizers, self.task_config.text, captions))
        return batch
