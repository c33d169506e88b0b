"""The FID InceptionV3 (pytorch-fid / torch-fidelity) in Flax NNX and its input protocols.

    from sga_jax.models import inception
    net = inception.load("pt_inception-2015-12-05-6726825d.pth")   # or a safetensors file, same names
    x = inception.inception_input(images, "diffusion-4k")          # [-1, 1] (B, H, W, 3) -> (B, 299, 299, 3)
    features = net(x)                                              # (B, 2048) pool features
"""

from sga_jax.models.inception.convert import WEIGHTS_FILE, key_map, load
from sga_jax.models.inception.model import (
    BATCH_NORM_EPS, FEATURES, BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionConfig, InceptionD,
    InceptionE, InceptionV3,
)
from sga_jax.models.inception.preprocess import (
    DEFAULT_PROTOCOL, INPUT_SIZE, PROTOCOLS, check_protocol, inception_input, to_uint8_levels,
)

__all__ = [
    "BATCH_NORM_EPS", "DEFAULT_PROTOCOL", "FEATURES", "INPUT_SIZE", "PROTOCOLS", "WEIGHTS_FILE", "BasicConv2d",
    "InceptionA", "InceptionB", "InceptionC", "InceptionConfig", "InceptionD", "InceptionE", "InceptionV3",
    "check_protocol", "inception_input", "key_map", "load", "to_uint8_levels",
]
