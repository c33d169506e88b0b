"""Assets of the embedded demo (`make demo`): real photographs shipped inside the scikit-image
wheel (training and held-out sets), captions written here, small tokenizers trained on those
captions, tiny random text encoders, and an LPIPS with a random trunk and the lpips package's
published lin weights. Nothing is downloaded. Every network of the demo is tiny (or, LPIPS's
trunk, full size) and randomly initialised (see configs/demo.py, configs/demo_vae.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from flax import nnx

from sga_jax import weights as W
from sga_jax.data.sources import skimage_sample_dataset
from sga_jax.models import lpips
from sga_jax.text import build_demo_text_folder

HELDOUT = {  # stage 1's held-out reconstruction batch: photographs the demo never trains on
    "retina": "a photograph of the back of a human eye, its retina and blood vessels",
    "camera": "a black and white photograph of a man with a camera on a tripod",
}
CAPTIONS = {
    "astronaut": "a portrait of an astronaut in a white spacesuit in front of the american flag",
    "coffee": "a cup of coffee on a saucer seen from above on a wooden table",
    "chelsea": "a ginger tabby cat looking to the side, close-up photograph",
    "rocket": "a rocket on its launch pad under a blue sky",
    "motorcycle_left": "a red racing motorcycle parked in a garage, side view",
    "hubble_deep_field": "a deep field of distant galaxies in the night sky",
}


def lpips_package_lins() -> Path:
    """The lin weights the lpips package ships (`lpips/weights/v0.1/vgg.pth`, a legacy pickle read
    by the safe reader), found without importing the package (or torch)."""
    spec = importlib.util.find_spec("lpips")
    path = Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "vgg.pth" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the demo's LPIPS takes its lin weights from the lpips package (lpips==0.1.4, "
                                "requirements-dev.txt; `make demo` installs it)")
    return path


def prepare_demo_lpips(directory: str | Path) -> Path:
    """Write `directory/lpips_demo.safetensors` once: LPIPS-VGG16 with a RANDOM trunk
    (torchvision's trained VGG16 is a download) and the lpips package's real lin weights (all
    positive, so the distance stays a distance), for `config.model.lpips.trunk` of stage 1's demo."""
    path = Path(directory) / "lpips_demo.safetensors"
    if path.is_file():
        return path
    model = lpips.LPIPS(lpips.LPIPSConfig(), rngs=nnx.Rngs(0))
    reader = W.CheckpointReader(lpips_package_lins())
    rules = lpips.key_map()
    for k in range(len(lpips.model.TAP_CHANNELS)):
        layer = getattr(model, f"lin{k}")
        name = f"lin{k}.kernel"
        layer.kernel.set_value(W.read_param(reader, name, rules[name], tuple(layer.kernel[...].shape)))
    path.parent.mkdir(parents=True, exist_ok=True)
    lpips.save(model, path)
    return path


def prepare_demo_assets(directory: str | Path) -> dict[str, Path]:
    """Write the demo dataset (images + metadata.jsonl), the held-out images of stage 1's eval and
    a Flux-layout text folder (tokenizers trained on the captions, tiny RANDOM T5 / CLIP encoders)
    under `directory`, once.

    Returns {"data": dataset dir, "heldout": held-out images dir, "text": text folder (for
    `config.text.root`)}.
    """
    directory = Path(directory)
    data = directory / "images"
    if not (data / "metadata.jsonl").is_file():
        skimage_sample_dataset(data, CAPTIONS)
    heldout = directory / "heldout"
    if not (heldout / "metadata.jsonl").is_file():
        skimage_sample_dataset(heldout, HELDOUT)
    text = directory / "text"
    if not (text / "text_encoder" / "config.json").is_file():
        build_demo_text_folder(text, CAPTIONS.values())
    return {"data": data, "heldout": heldout, "text": text}
