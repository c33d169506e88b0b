"""Stage 1's loss written in PyTorch with torch autograd, from the formulas of taming (L1 + LPIPS,
PatchGAN hinge loss, adaptive weight at the decoder's last layer), VA-VAE (the SGA weight at the
encoder's last layer), Diffusion-4K (the F16 form, scale consistency) and the SGA paper (moment
anchoring, the Gram loss). The oracle of tests/test_vae_stage_torch.py and the PyTorch side of
bench/vae_stage.py; only tests and benches import it."""

from __future__ import annotations

import copy
import dataclasses

import torch
from diffusers import AutoencoderKL
from taming.modules.losses.vqperceptual import hinge_d_loss

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def f16_form(model: AutoencoderKL) -> AutoencoderKL:
    """A copy of `model` in Diffusion-4K's F16 form: stride-2 conv_in, nearest x2 before conv_out
    (a forward pre-hook, so the state dict keeps diffusers' names)."""
    model = copy.deepcopy(model)
    model.encoder.conv_in.stride = (2, 2)
    model.decoder.conv_out.register_forward_pre_hook(
        lambda module, args: (torch.nn.functional.interpolate(args[0], scale_factor=2, mode="nearest"),))
    return model


def conv_out_input(module: torch.nn.Module) -> dict:
    """{"x": the input of `module`'s last call}, kept by a forward pre-hook (after earlier hooks)."""
    seen = {}
    module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    return seen


def gram_loss(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SGA: batch mean of (1/N^2) ||G(gen) - G(ref)||_F^2 with rows L2-normalised, tokens (B, N, C)."""
    def gram(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.normalize(t, dim=-1)
        return t @ t.transpose(1, 2)

    return torch.mean(torch.sum((gram(gen) - gram(ref)) ** 2, dim=(1, 2)) / gen.shape[1] ** 2)


def adaptive_weight(numerator: torch.Tensor, denominator: torch.Tensor, layer: torch.Tensor, clamp: float) -> torch.Tensor:
    """clamp(||d numerator / d layer|| / (||d denominator / d layer|| + 1e-4), 0, clamp), detached."""
    a = torch.autograd.grad(numerator, layer, retain_graph=True)[0]
    b = torch.autograd.grad(denominator, layer, retain_graph=True)[0]
    return torch.clamp(torch.norm(a) / (torch.norm(b) + 1e-4), 0.0, clamp).detach()


@dataclasses.dataclass
class Weights:
    lpips: float = 1.0
    disc: float = 0.5
    sga: float = 0.1
    moment: float = 1.0
    sc: float = 1.0


class Stage1Loss:
    """The trainable F16 student, its frozen F16 reference and F8 teacher (all from `ae`), the
    discriminator, LPIPS, and optionally the prior (images -> tokens (B, N, C)) with the SGA head
    (a Conv2d on the posterior mean). The decoder reconstructs the posterior mean."""

    def __init__(self, ae: AutoencoderKL, disc: torch.nn.Module, perceptual: torch.nn.Module, prior=None,
                 head: torch.nn.Module | None = None, weights: Weights = Weights()):
        self.student, self.reference, self.teacher = f16_form(ae).train(), f16_form(ae).eval(), copy.deepcopy(ae).eval()
        for frozen in (self.reference, self.teacher, perceptual):
            frozen.requires_grad_(False)
        self.disc, self.perceptual, self.prior, self.head, self.weights = disc, perceptual, prior, head, weights
        self.student_features = conv_out_input(self.student.decoder.conv_out)
        self.teacher_features = conv_out_input(self.teacher.decoder.conv_out)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term for images x (B, 3, H, W) in [-1, 1], the adaptive weights, the generator's
        objective ("generator") and the discriminator's ("loss_d")."""
        w = self.weights
        posterior = self.student.encode(x).latent_dist
        mean, logvar = posterior.mean, posterior.logvar
        recon = self.student.decode(mean).sample
        rec = torch.mean(torch.abs(x - recon))
        lp = self.perceptual(recon, x).mean()
        nll = rec + w.lpips * lp
        g = -torch.mean(self.disc(recon))
        lambda_adv = w.disc * adaptive_weight(nll, g, self.student.decoder.conv_out.weight, 1e4)
        with torch.no_grad():
            ref = self.reference.encode(x).latent_dist
            self.teacher.decode(self.teacher.encode(x).latent_dist.mean)
        moment = torch.mean((mean - ref.mean) ** 2) + torch.mean((logvar - ref.logvar) ** 2)
        sc = torch.mean((self.student_features["x"] - self.teacher_features["x"]) ** 2)
        generator = nll + lambda_adv * g + w.moment * moment + w.sc * sc
        terms = {"loss_rec": rec, "loss_lpips": lp, "loss_g": g, "loss_moment": moment, "loss_sc": sc,
                 "lambda_adv": lambda_adv}
        if self.head is not None:
            with torch.no_grad():
                pixels = ((x + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
                tokens = self.prior(pixels)
            sga = gram_loss(self.head(mean).flatten(2).transpose(1, 2), tokens)
            lambda_sga = w.sga * adaptive_weight(nll, sga, self.student.encoder.conv_out.weight, 1e8)
            generator = generator + lambda_sga * sga
            terms.update(loss_sga=sga, lambda_sga=lambda_sga)
        terms["loss_d"] = hinge_d_loss(self.disc(x.detach()), self.disc(recon.detach()))
        terms["generator"] = generator
        return terms
