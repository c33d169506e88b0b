"""Random FID Inception weights in torchvision's key names, and pytorch-fid's network holding them
(built offline: pytorch-fid's weight download is replaced by the random state dict)."""

from __future__ import annotations

import math
from unittest import mock

import torch
from pytorch_fid import inception as pytorch_fid_inception


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of torchvision's `Inception3(num_classes=1008, aux_logits=False)` with every
    tensor random: He-scaled conv kernels, BatchNorm affine and running statistics near 1 / 0 (so
    activations keep their scale through the 94 layers), a small fc."""
    template = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in template.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("conv.weight"):
            value = noise * math.sqrt(2.0 / tensor[0].numel())
        elif name.endswith("bn.weight"):
            value = 1.0 + 0.2 * noise
        elif name.endswith("running_var"):
            value = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif name.endswith("num_batches_tracked"):
            value = tensor
        else:
            value = 0.1 * noise
        state[name] = value.to(tensor.dtype).contiguous()
    return state


def pytorch_fid_network(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """pytorch-fid's `InceptionV3([3])` (its FID blocks, resize to 299 and [0, 1] -> [-1, 1]
    inside) holding `state`, in eval mode."""
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
        return pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
