"""Discriminator weights from taming / latent-diffusion checkpoints (converted to safetensors).

taming's `NLayerDiscriminator` is one `nn.Sequential` named `main`: conv `main.0`, then per block
conv `main.{3j+2}` and BatchNorm `main.{3j+3}`, and the last conv `main.{3 n_layers + 2}`. In a
training checkpoint it sits under `loss.discriminator.` (that prefix is stripped). BatchNorm's
running statistics (`running_mean`, `running_var`, `num_batches_tracked`) are ignored: the
discriminator only runs in training mode, on batch statistics (see `model.py`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sga_jax import weights as W
from sga_jax.models import nn
from sga_jax.models.discriminator.model import NLayerDiscriminator, PatchGANConfig

PREFIX = "loss.discriminator."
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def key_map(config: PatchGANConfig) -> dict[str, W.Rule]:
    """{our dotted parameter path: Rule} for taming's `main.{i}` names."""
    rules = {"conv_in.kernel": W.rule("main.0.weight", transform=W.CONV2D), "conv_in.bias": W.rule("main.0.bias")}
    for j in range(config.n_layers):
        conv, norm = 3 * j + 2, 3 * j + 3
        rules[f"blocks.{j}.conv.kernel"] = W.rule(f"main.{conv}.weight", transform=W.CONV2D)
        rules[f"blocks.{j}.norm.scale"] = W.rule(f"main.{norm}.weight")
        rules[f"blocks.{j}.norm.bias"] = W.rule(f"main.{norm}.bias")
    last = 3 * config.n_layers + 2
    rules["conv_out.kernel"] = W.rule(f"main.{last}.weight", transform=W.CONV2D)
    rules["conv_out.bias"] = W.rule(f"main.{last}.bias")
    return rules


def open_checkpoint(path: str | os.PathLike) -> tuple[W.CheckpointReader, bool]:
    """(reader with taming's names, whether they sat under `loss.discriminator.`)."""
    reader = W.CheckpointReader(path)
    if "main.0.weight" in reader:
        return reader, False
    if PREFIX + "main.0.weight" in reader:
        return W.CheckpointReader(path, prefix=PREFIX), True
    raise W.CheckpointError(f"{reader.path}: no taming discriminator in it (neither 'main.0.weight' nor "
                            f"'{PREFIX}main.0.weight'; first keys: {', '.join(reader.keys()[:8])})")


def infer_config(reader: W.CheckpointReader) -> PatchGANConfig:
    """in_channels, ndf and n_layers from the tensor shapes."""
    ndf, in_channels = reader.shape("main.0.weight")[:2]
    n_layers = 0
    while f"main.{3 * n_layers + 3}.running_mean" in reader or f"main.{3 * n_layers + 3}.weight" in reader:
        n_layers += 1
    return PatchGANConfig(in_channels=in_channels, ndf=ndf, n_layers=n_layers)


def load(path: str | os.PathLike, config: PatchGANConfig | None = None, *, shardings: Any = None,
         **overrides: Any) -> NLayerDiscriminator:
    """A discriminator from a safetensors file with taming's names (bare or under
    `loss.discriminator.`); `config` inferred from the shapes when None, `overrides` replace fields
    (e.g. dtype). Keys other than the discriminator's are ignored in a prefixed training checkpoint."""
    reader, prefixed = open_checkpoint(path)
    config = config if config is not None else infer_config(reader)
    if overrides:
        config = dataclasses.replace(config, **overrides)

    def ignore(key: str) -> bool:
        return key.endswith(RUNNING_STATS) or (prefixed and not key.startswith("main."))

    return W.load_module(lambda: NLayerDiscriminator(config, rngs=nn.construction_rngs(0)), reader, key_map(config),
                         shardings=shardings, ignore=ignore)
