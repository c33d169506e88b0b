"""Assets of the embedded demo (`make demo`): real photographs shipped inside the scikit-image
wheel (training and held-out sets), captions written here, small tokenizers trained on those captions, and tiny random text
encoders. Nothing is downloaded. Every network of the demo is tiny and randomly initialised
(see configs/demo.py)."""

from __future__ import annotations

from pathlib import Path

from sga_jax.data.sources import skimage_sample_dataset
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


def prepare_demo_assets(directory: str | Path) -> dict[str, Path]:
    """Write the demo dataset (images + metadata.jsonl) and a Flux-layout text folder (tokenizers
    trained on the captions, tiny RANDOM T5 / CLIP encoders) under `directory`, once.

    Returns {"data": dataset dir, "heldout": held-out images (stage 1's eval), "text": text folder
    (for `config.text.root`)}.
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
