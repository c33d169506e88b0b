"""LPIPS weights in and out: the VGG16 trunk under torchvision's names and the lin layers under the
lpips package's.

* Trunk: torchvision's `vgg16-397923af.pth` (a zip pickle, read by the safe reader of
  `sga_jax.weights`) or any file with its key names, `features.{0,2,5,...,28}.{weight,bias}`, e.g.
  timm's `vgg16.tv_in1k` safetensors. Classifier / head keys (anything outside `features.` and
  `lin{k}.`) are ignored.
* Lin layers: the lpips package's `weights/v0.1/vgg.pth` (legacy pickle), keys
  `lin{0..4}.model.1.weight` of shape (1, C, 1, 1). The lpips module names them `model.1` when
  built with dropout (its default) and `model.0` without; both are read. Which one is present is
  detected, and every lin key must be found: a silent `strict=False` miss, the
  PerceptualSimilarity #93 gotcha, cannot happen here.

`save` writes both halves into one safetensors file under those names, which `load` reads back.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from flax import nnx

from sga_jax import weights as W
from sga_jax.models.lpips.model import CONVS, LPIPS, TAP_CHANNELS, LPIPSConfig
from sga_jax.weights.converted import is_converted, load_converted
from sga_jax.models import nn

FORMATS = ("lpips",)
FILENAME = "lpips_vgg16.safetensors"
LIN_NAMES = ("model.1", "model.0")  # with dropout (lpips' default, its published file), without


def key_map(lin_name: str = LIN_NAMES[0]) -> dict[str, W.Rule]:
    """{our parameter path: Rule}: torchvision's trunk names, lpips's lin names (`lin{k}.<lin_name>`)."""
    rules = {}
    for index in CONVS:
        rules[f"features.{index}.kernel"] = W.rule(f"features.{index}.weight", transform=W.CONV2D)
        rules[f"features.{index}.bias"] = W.rule(f"features.{index}.bias")
    for k in range(len(TAP_CHANNELS)):
        rules[f"lin{k}.kernel"] = W.rule(f"lin{k}.{lin_name}.weight", transform=W.TrailingOnes(2, W.LINEAR))
    return rules


def _lin_name(reader: W.CheckpointReader) -> str:
    for name in LIN_NAMES:
        if f"lin0.{name}.weight" in reader:
            return name
    raise W.CheckpointError(
        f"{' + '.join(map(str, reader.paths))}: no LPIPS lin weights ('lin0.model.1.weight'); pass lin= the lpips "
        "package's weights/v0.1/vgg.pth (or a file with its keys)"
    )


def _not_lpips(key: str) -> bool:
    """Keys LPIPS does not use: the trunk's classifier, other heads, the lpips module's `lins.{k}`
    aliases of its `lin{k}` layers."""
    return not (key.startswith("features.") or re.match(r"lin\d\.", key))


def load(
    trunk: str | os.PathLike,
    lin: str | os.PathLike | None = None,
    *,
    shardings: Any = None,
    **overrides: Any,
) -> LPIPS:
    """LPIPS-VGG16 from its trunk file (torchvision names) and lin file (lpips names).

    `lin=None` reads the lin layers from `trunk` too: a file written by `save`, or a directory
    holding both files (e.g. `vgg16-397923af.pth` beside `vgg.pth`). `trunk` may also be a
    directory written by `python -m sga_jax.convert lpips` (then `lin` must be None).
    `overrides` set config fields (`dtype="bfloat16"`); `shardings` is a State-shaped tree of
    shardings, or a function of the abstract parameter state returning one (e.g.
    `lambda abstract: parallel.state_shardings(abstract, mesh, rules)`).
    """
    if is_converted(trunk):
        if lin is not None:
            raise ValueError(f"{trunk} is a converted LPIPS directory, which already holds the lin weights; drop lin=")
        return load_converted(trunk, shardings=shardings, **overrides)
    reader = W.CheckpointReader([trunk] if lin is None else [trunk, lin])
    config = dataclasses.replace(LPIPSConfig(), **overrides)
    return W.load_module(lambda: LPIPS(config, rngs=nn.construction_rngs(0)), reader, key_map(_lin_name(reader)),
                         shardings=shardings, ignore=_not_lpips)


def save(model: LPIPS, path: str | os.PathLike, format: str = "lpips", *, dtype: Any = None) -> list[Path]:
    """Write the trunk (torchvision names) and lin layers (lpips names, `model.1`) as one safetensors
    file; a directory gets `lpips_vgg16.safetensors`. `dtype` casts tensors (default: as stored)."""
    if format not in FORMATS:
        raise ValueError(f"unknown LPIPS export format {format!r}; expected one of {FORMATS}")
    path = Path(path)
    target = path if path.suffix == ".safetensors" else path / FILENAME
    return W.save_state(target, nnx.state(model, nnx.Param), key_map(), dtype=dtype, metadata={"format": format})
