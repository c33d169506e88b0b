"""Stage 1: SGA fine-tuning of the Flux VAE in its F16 form (paper Eq. 6-7), as a Task for the engine.

One step, L = L_base + lambda_m L_moment + lambda_sga L_SGA (+ the discriminator's own objective):

* encode: the trainable F16 encoder's posterior (mean, logvar); the decoder reconstructs a sample
  (or the mean, `loss.decode_latent`); L_rec (L1 or MSE) + w_lpips LPIPS is the NLL.
* GAN (taming): lambda_adv L_G with L_G = -mean D(x_rec) through a copy of the discriminator with
  no gradient, lambda_adv = clip(||dNLL/dW|| / (||dL_G/dW|| + 1e-4), 0, 1e4) * disc_weight at the
  decoder's `conv_out` kernel W; and the discriminator's hinge (or vanilla) loss on D(x) and
  D(x_rec) with no gradient into the VAE. Before `gan.start` both are gated to zero (values and
  gradients), as taming's `adopt_weight` does, in the same program: under a `lax.cond`, XLA:CPU
  leaves the discriminator's kernel-gradient convolutions in a layout it runs about 25x slower.
  The two players' objectives are summed, each blind to the other's parameters, so one gradient
  carries both; `param_groups` gives the discriminator its own optimizer (`optimizer.groups.disc`).
* moment anchoring: squared error of the posterior mean and log-variance against a frozen copy of
  the pre-trained encoder (F16 form, or the F8 encoder's moments pooled 2x2).
* scale consistency (Diffusion-4K's SC-VAE): MSE between the frozen F8 teacher decoder's
  pre-`conv_out` features (decoding its own latent of the image) and the F16 student's, upsampled.
* SGA: a conv head on the posterior mean (or a sample), pooled to the prior's grid, `sga_loss`
  against the frozen prior's tokens of the same image; lambda_sga = clip(||dNLL/dW_e|| /
  (||dL_SGA/dW_e|| + 1e-4), 0, clamp) * sga_weight at the encoder's `conv_out` kernel (VA-VAE).

Evaluation (`eval_every`): PSNR / SSIM / LPIPS of the held-out batch's reconstructions and the
feature-drift probe (`sga_jax.stages.probe`, docs/geometry.md) on the encoder's latents (the
posterior mean, what the SGA head sees) with the reconstruction as the output; the `start` and
`evaluate` hooks drive it and the `_probe_*` methods are its taps.

Trainable: the F16 VAE (`loss.parts`: encoder, decoder or both), the SGA head, the discriminator.
Frozen: the pre-trained VAE (one parameter tree, run as F16 for the moment reference and as F8 for
the scale-consistency teacher), the prior (with alignment or the probe) and LPIPS. Both VAEs come from `config.model.vae.weights`
(the random initial weights of the trainable VAE when empty, so the anchors are the start point).
Config: `configs/vae_sga.py`; the task's sections are `config.model`, `config.loss`, `config.align`,
`config.eval` and `config.probe`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sga_jax import parallel
from sga_jax.align import SGAHead, adaptive_avg_pool, grid_to_tokens, sga_loss
from sga_jax.data.pipeline import make_pipeline
from sga_jax.encoders import FoundationEncoder
from sga_jax.errors import ConfigError
from sga_jax.metrics.lpips import lpips_distance
from sga_jax.metrics.reconstruction import psnr, ssim
from sga_jax.models import discriminator, lpips, nn, vae
from sga_jax.stages import common, probe
from sga_jax.stages.vae import losses
from sga_jax.train import plots
from sga_jax.train.state import FrozenState
from sga_jax.weights import converted

log = logging.getLogger(__name__)

ALIGN_METHODS = ("sga", "none")
MOMENT_REFERENCES = ("f16", "f8_pooled")
PARTS = ("both", "encoder", "decoder")
LATENTS = ("sample", "mean")
DISC_GROUP = "disc"


@dataclasses.dataclass(frozen=True)
class Networks:
    """Resolved configs of every network of the stage (built once by `configure`)."""

    vae: vae.AutoEncoderConfig  # the trainable F16 VAE
    pretrained: vae.AutoEncoderConfig | None  # the frozen pre-trained VAE in its F8 form
    prior_kind: str
    prior: Any  # with alignment or the probe
    lpips: lpips.LPIPSConfig | None
    disc: discriminator.PatchGANConfig | None


class Posterior(NamedTuple):
    """What the trainable encoder gives for a batch of images."""

    moments: jax.Array  # (B, h, w, 2 z) the output of the encoder's conv_out
    features: jax.Array  # (B, h, w, C) its input
    mean: jax.Array  # (B, h, w, z) float32, unscaled
    logvar: jax.Array  # (B, h, w, z) float32, clamped to [-30, 20]


class VAEWithHeads(nnx.Module):
    """The trainable part: the F16 VAE, the SGA head (None without alignment) and the
    discriminator (None without the GAN)."""

    def __init__(self, ae: vae.AutoEncoder, head: SGAHead | None, disc: discriminator.NLayerDiscriminator | None):
        self.ae = ae
        self.head = head
        self.disc = disc


class FrozenModels(nnx.Module):
    """The frozen part: the pre-trained VAE (F8 form; None without moment and scale-consistency
    terms), the prior (None without alignment and probe) and LPIPS (None with lpips_weight 0)."""

    def __init__(self, pretrained: vae.AutoEncoder | None, prior: FoundationEncoder | None, perceptual: Any):
        self.pretrained = pretrained
        self.prior = prior
        self.lpips = perceptual


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r}: expected one of {choices}")


class VAESGATask:
    """The VAE stage: see the module docstring. Registered as task "vae_sga"."""

    images_per_example = 1

    def configure(self, config: ml_collections.ConfigDict) -> None:
        """Resolve and check every network config and loss setting before anything compiles."""
        m, loss, align = config.model, config.loss, config.align
        _choice("loss.rec", loss.rec, losses.REC_KINDS)
        _choice("loss.decode_latent", loss.decode_latent, LATENTS)
        _choice("loss.parts", loss.parts, PARTS)
        _choice("loss.gan.loss", loss.gan.loss, losses.GAN_LOSSES)
        _choice("loss.moment.reference", loss.moment.reference, MOMENT_REFERENCES)
        _choice("align.method", align.method, ALIGN_METHODS)
        _choice("align.latent", align.latent, LATENTS)
        encoder_terms = [name for name, on in (("align", align.method == "sga"), ("loss.moment", loss.moment.weight > 0))
                         if on]
        if loss.parts == "decoder" and encoder_terms:
            raise ConfigError(f"config.loss.parts='decoder' freezes the encoder, which is all that {encoder_terms} train: "
                              "switch them off (align.method='none', loss.moment.weight=0) or train the encoder")
        frozen_dtype = m.get("frozen_dtype", "float32")
        base = common.model_config(m.vae, vae.AutoEncoderConfig, "vae")
        vae_config = dataclasses.replace(base, f16=m.vae.f16, dtype=config.precision.compute_dtype,
                                         param_dtype="float32", remat=m.vae.get("remat", "none"))
        uses_pretrained = loss.moment.weight > 0 or loss.sc.weight > 0
        pretrained = dataclasses.replace(base, f16=False, dtype=frozen_dtype, param_dtype=frozen_dtype) if uses_pretrained else None
        probing = probe.is_enabled(config)  # the probe measures the prior's structure in vanilla runs too
        prior_kind, prior = common.prior_config(m.prior, frozen_dtype, needed=align.method == "sga" or probing)
        perceptual = lpips.LPIPSConfig(dtype=frozen_dtype, param_dtype=frozen_dtype) if loss.lpips_weight > 0 else None
        disc = None
        if loss.gan.weight > 0:
            disc = discriminator.PatchGANConfig(in_channels=vae_config.out_ch, ndf=m.disc.ndf, n_layers=m.disc.n_layers,
                                                dtype=config.precision.compute_dtype, param_dtype="float32")
        self.config = config
        self.networks = Networks(vae_config, pretrained, prior_kind, prior, perceptual, disc)
        self.mesh: Mesh | None = None
        self.probe = None
        if probing:
            taps = probe.Taps(examples=self._probe_examples, prepare=self._probe_prepare, tap=self._probe_tap,
                              image_output=True)
            self.probe = probe.FeatureProbe(config.probe, taps)

    # ---------------------------------------------------------------------------------- models

    def _frozen(self, vae_key: jax.Array, rngs: nnx.Rngs) -> FrozenModels:
        nets = self.networks
        pretrained = vae.AutoEncoder(nets.pretrained, rngs=nn.construction_rngs(vae_key)) if nets.pretrained is not None else None
        prior = None
        if nets.prior is not None:
            model = common.PRIOR_MODELS[nets.prior_kind][1](nets.prior, rngs=rngs)
            prior = FoundationEncoder(nets.prior_kind, model, long_edge=self.config.align.long_edge)
        perceptual = lpips.LPIPS(nets.lpips, rngs=rngs) if nets.lpips is not None else None
        return FrozenModels(pretrained, prior, perceptual)

    def build(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> tuple[VAEWithHeads, FrozenModels]:
        """(trainable VAE + head + discriminator, frozen pre-trained VAE / prior / LPIPS), randomly
        initialised; the two VAEs from one key, so without weight files the anchors are the start."""
        nets, align = self.networks, config.align
        vae_key = rngs.params()
        head = None
        if align.method == "sga":
            prior_dim = nets.prior.embed_dim_per_stage[-1] if nets.prior_kind == "sam2" else nets.prior.hidden_size
            head = SGAHead(nets.vae.z_channels, prior_dim, kernel_size=align.head_kernel,
                           dtype=nn.dtype_of(nets.vae.dtype), rngs=rngs)
        disc = discriminator.NLayerDiscriminator(nets.disc, rngs=rngs) if nets.disc is not None else None
        trainable = VAEWithHeads(vae.AutoEncoder(nets.vae, rngs=nn.construction_rngs(vae_key)), head, disc)
        return trainable, self._frozen(vae_key, rngs)

    def param_groups(self, params: dict) -> dict:
        """The discriminator in group "disc"; the VAE parts that `loss.parts` does not train
        "frozen"; the rest (VAE, head) "default"."""
        parts = self.config.loss.parts
        labels = jax.tree.map(lambda _: "default", params)
        labels["ae"] = {name: jax.tree.map(lambda _: "default" if parts in ("both", name) else "frozen", tree)
                        for name, tree in params["ae"].items()}
        if params.get("disc") is not None:
            labels["disc"] = jax.tree.map(lambda _: DISC_GROUP, params["disc"])
        return labels

    def load_pretrained(self, params: dict, shardings: dict) -> dict:
        """The VAE from `config.model.vae.weights` (F8 or F16 weights, run as F16) and the
        discriminator from `config.model.disc.weights`, when set; the head starts random."""
        m = self.config.model
        nets = self.networks
        out = dict(params)
        vae_weights = common.weights_path(m.vae, "vae")
        if vae_weights is not None:
            model = converted.load_model("vae", vae_weights, shardings=shardings["ae"], f16=nets.vae.f16,
                                         dtype=nets.vae.dtype, param_dtype="float32", remat=nets.vae.remat)
            out["ae"] = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        else:
            log.warning("config.model.vae.weights is empty: the VAE starts from RANDOM weights")
        if nets.disc is not None and m.disc.get("weights", ""):
            model = discriminator.load(m.disc.weights, shardings=shardings["disc"], dtype=nets.disc.dtype)
            out["disc"] = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return out

    def load_frozen(self, abstract: FrozenState, shardings: FrozenState) -> FrozenState:
        """Frozen weights from their paths (or hub ids), each streamed into its shardings; parts
        without a path are initialised as the engine would (the pre-trained VAE then equals the
        trainable's start)."""
        m = self.config.model
        parts = abstract.module
        paths = {}
        if parts.get("pretrained") is not None:
            paths["pretrained"] = common.weights_path(m.vae, "vae")
        if parts.get("prior") is not None:
            paths["prior"] = common.weights_path(m.prior, self.networks.prior_kind)
        if parts.get("lpips") is not None:
            trunk = m.lpips.get("trunk", "")
            paths["lpips"] = converted.resolve_weights("lpips", trunk) if trunk else None

        def init_random(key: jax.Array) -> dict:
            return nnx.to_pure_dict(nnx.state(self.build(self.config, nn.construction_rngs(key))[1]))

        loaded = common.load_frozen_parts(paths, lambda name: shardings.module[name], self._load_frozen_part,
                                          init_random, int(self.config.seed))
        return FrozenState(trainable={}, module={name: loaded.get(name) for name in parts})

    def _load_frozen_part(self, name: str, path: Path, shardings: dict) -> dict:
        nets = self.networks
        if name == "pretrained":
            model = converted.load_model("vae", path, shardings=shardings, f16=False, dtype=nets.pretrained.dtype,
                                         param_dtype=nets.pretrained.param_dtype)
            return nnx.to_pure_dict(nnx.state(model))
        if name == "prior":
            dtype = nets.prior.dtype
            model = converted.load_model(nets.prior_kind, path, shardings=shardings["model"], dtype=dtype, param_dtype=dtype)
            return {"model": nnx.to_pure_dict(nnx.state(model))}
        lin = self.config.model.lpips.get("lin", "") or None
        model = lpips.load(path, lin, shardings=shardings, dtype=nets.lpips.dtype, param_dtype=nets.lpips.param_dtype)
        return nnx.to_pure_dict(nnx.state(model))

    # ------------------------------------------------------------------------------------ loss

    @staticmethod
    def encode(encoder: vae.Encoder, images: jax.Array) -> Posterior:
        """The trainable encoder's posterior of `images` and its conv_out input: the latents SGA
        aligns, and the layer where lambda_sga is measured."""
        moments, features = encoder(images, return_features=True)
        return Posterior(moments, features, *vae.posterior_moments(moments))

    def _check_size(self, height: int, width: int) -> None:
        factor = self.networks.vae.downsample_factor
        if height % factor or width % factor:
            raise ConfigError(f"image {height}x{width} must be a multiple of {factor} px (the VAE's factor); "
                              "set config.data.buckets accordingly")

    def _parts(self, ae: vae.AutoEncoder) -> tuple[vae.Encoder, vae.Decoder]:
        """(encoder, decoder), with no gradient into the one `loss.parts` leaves frozen."""
        parts = self.config.loss.parts
        encoder = common.frozen_copy(ae.encoder) if parts == "decoder" else ae.encoder
        decoder = common.frozen_copy(ae.decoder) if parts == "encoder" else ae.decoder
        return encoder, decoder

    def loss(self, trainable: VAEWithHeads, frozen: FrozenModels, batch: dict, rng: jax.Array, *,
             step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The generator's L_base + L_moment + L_SC + lambda_sga L_SGA plus the discriminator's
        objective; every term in the metrics (unweighted), with lambda_adv and lambda_sga.

        The terms of frozen networks (LPIPS, the discriminator as the generator sees it) are
        differentiated once with respect to the reconstruction (`losses.value_and_grad_at`); that
        gradient gives both the adaptive weights and, through `losses.with_gradient`, the total
        loss's gradient, so no backward pass through LPIPS or the discriminator is repeated."""
        cfg = self.config.loss
        images = batch["image"].astype(jnp.float32)
        b, height, width, _ = images.shape
        self._check_size(height, width)
        weights = common.example_weights(batch, b)

        def total_of(per_example: jax.Array) -> jax.Array:
            return jnp.sum(weights * per_example)

        frozen = common.frozen_copy(frozen)  # the engine does so too; explicit for direct calls
        encoder, decoder = self._parts(trainable.ae)
        post = self.encode(encoder, images)
        decode_key, align_key = jax.random.split(rng)
        eps = jax.random.normal(decode_key, post.mean.shape, jnp.float32)

        def decode(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
            mean, logvar = vae.posterior_moments(moments)
            z = mean + jnp.exp(0.5 * logvar) * eps if cfg.decode_latent == "sample" else mean
            recon, features = decoder(z, return_features=True)
            return recon.astype(jnp.float32), features

        def nll(recon: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            rec = total_of(losses.reconstruction_loss(images, recon, cfg.rec))
            if frozen.lpips is None:
                return rec, (rec, jnp.zeros((), jnp.float32))
            perceptual = total_of(frozen.lpips(recon, images))
            return rec + cfg.lpips_weight * perceptual, (rec, perceptual)

        (recon, dec_features), decode_pullback = jax.vjp(decode, post.moments)
        loss_nll, nll_grad, (loss_rec, loss_lpips) = losses.value_and_grad_at(nll, recon)
        total = losses.with_gradient(loss_nll, nll_grad, recon)
        metrics = {"loss_rec": loss_rec, "loss_lpips": loss_lpips}
        if trainable.disc is not None:
            gan_total, gan_metrics = self._adversarial(trainable.disc, decoder, images, recon, dec_features, nll_grad,
                                                       total_of, step)
            total = total + gan_total
            metrics.update(gan_metrics)
        if frozen.pretrained is not None:
            total = total + self._anchors(frozen.pretrained, images, post, dec_features, total_of, metrics)
        if trainable.head is not None:
            nll_moments_grad = decode_pullback((nll_grad, jnp.zeros_like(dec_features)))[0]
            loss_sga, lambda_sga = self._alignment(trainable.head, frozen.prior, encoder, images, post,
                                                   nll_moments_grad, total_of, align_key)
            total = total + lambda_sga * loss_sga
            metrics.update(loss_sga=loss_sga, lambda_sga=lambda_sga)
        return total, metrics

    def _adversarial(self, disc: discriminator.NLayerDiscriminator, decoder: vae.Decoder, images: jax.Array,
                     recon: jax.Array, dec_features: jax.Array, nll_grad: jax.Array,
                     total_of: Callable[[jax.Array], jax.Array], step: jax.Array) -> tuple[jax.Array, dict]:
        """lambda_adv L_G + L_D from `gan.start` on; before it, the terms and their metrics are zero."""
        gan = self.config.loss.gan
        judge = common.frozen_copy(disc)  # the generator's view: no gradient into the discriminator

        def generator_term(image: jax.Array) -> tuple[jax.Array, None]:
            return total_of(losses.generator_loss(judge(image))), None

        loss_g, gen_grad, _ = losses.value_and_grad_at(generator_term, recon)
        lambda_adv = gan.weight * losses.adaptive_weight(decoder.conv_out, dec_features, nll_grad, gen_grad,
                                                         clamp=gan.clamp)
        logits_real = disc(jax.lax.stop_gradient(images))
        logits_fake = disc(jax.lax.stop_gradient(recon))
        loss_d = total_of(losses.discriminator_loss(logits_real, logits_fake, gan.loss))
        loss_g = losses.with_gradient(loss_g, gen_grad, recon)
        metrics = {"loss_g": loss_g, "loss_d": loss_d, "lambda_adv": lambda_adv,
                   "disc_real": jnp.mean(logits_real.astype(jnp.float32)),
                   "disc_fake": jnp.mean(logits_fake.astype(jnp.float32))}
        active = step >= gan.start

        def gated(x: jax.Array) -> jax.Array:
            return jnp.where(active, x, jnp.zeros_like(x))

        return gated(lambda_adv * loss_g + loss_d), {name: gated(value) for name, value in metrics.items()}

    def _anchors(self, pretrained: vae.AutoEncoder, images: jax.Array, post: Posterior, dec_features: jax.Array,
                 total_of: Callable[[jax.Array], jax.Array], metrics: dict) -> jax.Array:
        """lambda_m L_moment + lambda_sc L_SC against the frozen pre-trained VAE; their terms go to `metrics`."""
        cfg = self.config.loss
        total = jnp.zeros((), jnp.float32)
        teacher_mean = None
        if cfg.moment.weight > 0:
            if cfg.moment.reference == "f16":
                ref_mean, ref_logvar = pretrained.in_form(True).encode_moments(images)
            else:
                teacher_mean, teacher_logvar = pretrained.encode_moments(images)
                grid = post.mean.shape[1:3]
                ref_mean, ref_logvar = adaptive_avg_pool(teacher_mean, grid), adaptive_avg_pool(teacher_logvar, grid)
            metrics["loss_moment"] = total_of(losses.moment_loss(post.mean, post.logvar, ref_mean, ref_logvar))
            total = total + cfg.moment.weight * metrics["loss_moment"]
        if cfg.sc.weight > 0:
            if teacher_mean is None:
                teacher_mean, _ = pretrained.encode_moments(images)
            _, teacher_features = pretrained.decoder(teacher_mean, return_features=True)
            metrics["loss_sc"] = total_of(losses.scale_consistency_loss(dec_features, teacher_features))
            total = total + cfg.sc.weight * metrics["loss_sc"]
        return total

    def _alignment(self, head: SGAHead, prior: FoundationEncoder, encoder: vae.Encoder, images: jax.Array,
                   post: Posterior, nll_moments_grad: jax.Array, total_of: Callable[[jax.Array], jax.Array],
                   rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(L_SGA, lambda_sga): the head on the latent against the prior's tokens of the same
        images; `nll_moments_grad` is the NLL's gradient with respect to the encoder's moments."""
        align = self.config.align
        ref = prior(images)
        b, gh, gw, c = ref.shape
        ref = ref.reshape(b, gh * gw, c).astype(jnp.float32)
        grid = post.mean.shape[1:3]
        noise = jax.random.normal(rng, post.mean.shape, jnp.float32) if align.latent == "sample" else None

        def sga_of_moments(moments: jax.Array) -> jax.Array:
            mean, logvar = vae.posterior_moments(moments)
            latent = mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise
            gen, _ = head(grid_to_tokens(latent), grid, out_grid=(gh, gw))
            sga = functools.partial(sga_loss, method=align.sga_method)
            return total_of(common.per_example(sga, gen.astype(jnp.float32), ref))

        loss_sga = sga_of_moments(post.moments)
        if not align.adaptive:
            return loss_sga, jnp.asarray(align.weight, jnp.float32)
        _, sga_grad, _ = losses.value_and_grad_at(lambda m: (sga_of_moments(m), None), post.moments)
        lambda_sga = align.weight * losses.adaptive_weight(encoder.conv_out, post.features, nll_moments_grad, sga_grad,
                                                           clamp=align.clamp)
        return loss_sga, lambda_sga

    # ------------------------------------------------------------------------------ data, hooks

    plan_levers = {"remat": "model.vae.remat"}  # the planner's suggestions (sga_jax.plan.levers)

    def batch_shapes(self, config: ml_collections.ConfigDict, bucket: tuple[int, int] | None) -> dict:
        """Global shapes of the arrays the step takes for a (width, height) bucket (the planner's
        input): images in [-1, 1] and the padding mask."""
        if bucket is None:
            raise ValueError("vae_sga batches come in buckets (config.data.buckets): give a (width, height)")
        width, height = bucket
        self._check_size(height, width)
        b, sds = int(config.batch_size), jax.ShapeDtypeStruct
        return {"image": sds((b, height, width, 3), jnp.float32), "valid": sds((b,), jnp.bool_)}

    def batches(self, config: ml_collections.ConfigDict, mesh: Mesh, *, seed: int) -> common.ImageBatches:
        """The Grain pipeline of `config.data` (captions unused)."""
        self.mesh = mesh
        return common.ImageBatches(config, mesh, seed=seed)

    @functools.cached_property
    def heldout(self) -> np.ndarray:
        """The fixed held-out images of `config.eval` (B, S, S, 3) in [-1, 1], center crops."""
        e = self.config.eval
        data = ml_collections.ConfigDict(self.config.data.to_dict())
        data.path = e.path or self.config.data.path
        data.buckets.fixed = f"{e.size}x{e.size}"
        data.global_batch_size = e.batch_size
        data.update(random_crop=False, flip=False, shuffle=False, remainder="pad", num_epochs=1, worker_count=0,
                    caption_cache="", index_cache="")
        batch = next(iter(make_pipeline(data, seed=0, process_index=0, process_count=1)))
        return batch["image"][batch["valid"]]

    def _reconstruct(self, trainable: VAEWithHeads) -> tuple[jax.Array, jax.Array]:
        """(held-out images, their reconstructions from the posterior mean, clipped to [-1, 1])."""
        images = self.heldout
        if self.mesh is not None:
            images = jax.device_put(images, parallel.replicated(self.mesh))
        graphdef, state = nnx.split(trainable.ae)
        return images, _reconstruct(graphdef, state, images)

    def start(self, trainable: VAEWithHeads, frozen: FrozenModels, step: int, workdir: str, rng: jax.Array):
        """The feature-drift probe's start: record the pre-trained latents (fresh start) or read them back."""
        return None if self.probe is None else self.probe.start(trainable, frozen, step, workdir, rng)

    def evaluate(self, trainable: VAEWithHeads, frozen: FrozenModels, step: int, workdir: str, rng: jax.Array) -> dict:
        """PSNR, SSIM (and LPIPS when loaded) of the held-out batch's reconstructions, means over
        images, and the feature-drift probe's numbers (`sga_jax.stages.probe.METRICS`)."""
        images, recon = self._reconstruct(trainable)
        out = {"psnr": float(jnp.mean(psnr(recon, images))), "ssim": float(jnp.mean(ssim(recon, images)))}
        if frozen.lpips is not None:
            out["lpips"] = float(jnp.mean(lpips_distance(frozen.lpips, recon, images)))
        if self.probe is not None:
            out.update(self.probe.measure(trainable))
        return out

    def _probe_examples(self, rng: jax.Array) -> dict[str, np.ndarray]:
        """`config.probe.batch_size` images from the data (the run's seed picks them); the stage
        needs no randomness of its own (the probe encodes to the posterior mean)."""
        return {"image": common.probe_examples(self.config)["image"]}

    def _probe_prepare(self, frozen: FrozenModels, examples: dict) -> tuple[dict, jax.Array]:
        """Frozen part of the probe: the images themselves and the prior's tokens of them."""
        images = examples["image"]
        return {"image": images}, frozen.prior(images)

    def _probe_tap(self, trainable: VAEWithHeads, inputs: dict) -> tuple[jax.Array, jax.Array]:
        """The encoder's posterior mean (B, h, w, z), what the SGA head aligns, and its reconstruction."""
        return _mean_and_reconstruction(trainable.ae, inputs["image"])

    def sample(self, trainable: VAEWithHeads, frozen: FrozenModels, step: int, workdir: str, rng: jax.Array) -> None:
        """original | reconstruction pairs of the held-out batch as `samples/step_NNNNNN.png`, and
        the loss curves (`loss_curve.png`)."""
        workdir = Path(workdir)
        plots.loss_curves(workdir / "metrics.jsonl", workdir / "loss_curve.png")
        images, recon = self._reconstruct(trainable)
        pairs = np.stack([np.asarray(images), np.asarray(recon)], axis=1).reshape(-1, *images.shape[1:])
        if jax.process_index() == 0:
            plots.save_grid(pairs, workdir / "samples" / f"step_{step:06d}.png", columns=2 * min(2, len(images)))
        return None

    export_formats = ("diffusers", "bfl")

    def export(self, read: Callable[[str, Any], dict], out: str | Path, *, format: str, dtype: str | None) -> None:
        """Write the trained F16 VAE with `vae.save` (head and discriminator are training-only);
        the file records the F16 form, which `vae.load` and stage 2's config read back."""
        config = dataclasses.replace(self.networks.vae, dtype="float32", param_dtype="float32", remat="none")
        graphdef, weights = nnx.split(nnx.eval_shape(lambda: vae.AutoEncoder(config, rngs=nn.construction_rngs(0))), nnx.Param)
        nnx.replace_by_pure_dict(weights, read("ae", nnx.to_pure_dict(weights)))
        vae.save(nnx.merge(graphdef, weights), out, format=format, dtype=dtype)


def _mean_and_reconstruction(ae: vae.AutoEncoder, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(posterior mean, its decoding clipped to [-1, 1] in float32)."""
    mean, _ = ae.encode_moments(images)
    return mean, jnp.clip(ae.decoder(mean).astype(jnp.float32), -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return _mean_and_reconstruction(nnx.merge(graphdef, state), images)[1]

