"""FID Inception weights in: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` has the same tensors; either `torch.save` pickle is read
by the safe reader of `sga_jax.weights`, which runs nothing from the file), or any safetensors file
with the same torchvision `Inception3` key names.

Each `X.conv.weight` + `X.bn.{weight,bias,running_mean,running_var}` becomes our folded
`X.conv.{kernel,bias}` (BatchNorm eps 1e-3); `fc.{weight,bias}` the 1008-class head; the
BatchNorms' `num_batches_tracked` counters are ignored. Import only: the folded network has no
export format (the public file is what users have).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from sga_jax import weights as W
from sga_jax.models import nn
from sga_jax.models.inception.model import BATCH_NORM_EPS, InceptionConfig, InceptionV3

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def key_map(params: nnx.State) -> dict[str, W.Rule]:
    """{our dotted parameter path: Rule} from a (possibly abstract) parameter state."""
    rules = {"fc.kernel": W.rule("fc.weight", transform=W.LINEAR), "fc.bias": W.rule("fc.bias")}
    for name in W.flat_params(params):
        if name.startswith("fc."):
            continue
        block, leaf = name.rsplit(".conv.", 1)
        bn = [f"{block}.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        if leaf == "kernel":
            rules[name] = W.rule(f"{block}.conv.weight", bn[0], bn[3],
                                 transform=W.FoldedBatchNormKernel(BATCH_NORM_EPS, W.CONV2D))
        else:
            rules[name] = W.rule(*bn, transform=W.FoldedBatchNormBias(BATCH_NORM_EPS))
    return rules


def _ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def load(path: str | os.PathLike, config: InceptionConfig | None = None, *, shardings: Any = None,
         **overrides: Any) -> InceptionV3:
    """Load the FID InceptionV3 from `path` (the weights file, see the module docstring).

    `config` defaults to the FID network with the fc width found in the file; `overrides`
    replace config fields (e.g. `dtype="bfloat16"`).
    """
    reader = W.CheckpointReader(path)
    if "fc.weight" not in reader or "Mixed_7c.branch_pool.conv.weight" not in reader:
        raise W.CheckpointError(f"{reader.path}: not an InceptionV3 checkpoint in torchvision names "
                                f"(no 'fc.weight' / 'Mixed_7c.branch_pool.conv.weight'; first keys: "
                                f"{', '.join(reader.keys()[:8])})")
    if config is None:
        config = InceptionConfig(num_classes=reader.shape("fc.weight")[0])
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return W.load_module(lambda: InceptionV3(config, rngs=nn.construction_rngs(0)), reader,
                         lambda model: key_map(nnx.state(model, nnx.Param)), shardings=shardings, ignore=_ignored)
