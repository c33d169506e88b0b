"""Weights in and out, shared by every model family.

- `reader`: `CheckpointReader`, a name -> tensor view of checkpoint files read one tensor at a
  time (no torch): safetensors (numpy framework, bf16 through ml_dtypes) and PyTorch pickles
- `torch_pickle`: `.pt/.pth/.bin/.ckpt` files of `torch.save` (zip and legacy formats) through an
  allow-listing unpickler that only rebuilds tensors and plain containers and never runs code
  from the file; any other global is refused by name (`UnsafePickleError`)
- `writer`: `write_safetensors`, streaming and atomic, sharded with an index when large (safetensors
  is the only format written)
- `keymap`: the key maps (`Rule`, transforms) that families' `convert.py` tables are made of, and
  `load_state` / `save_state` / `transcode_tensors` that apply them both ways
- `converted`: directories written by `python -m sga_jax.convert`, and the family registry
"""

from sga_jax.weights.fileio import CheckpointError
from sga_jax.weights.keymap import (
    CONV2D, LINEAR, SAME, Concat, KeyMap, Permute, Rule, SwapHalves, TrailingOnes, Transform, check_keys,
    export_specs, export_tensors, flat_params, load_module, load_state, read_param, rule, save_state,
    transcode_tensors,
)
from sga_jax.weights.reader import PICKLE_SUFFIXES, SAFETENSORS_DTYPES, CheckpointReader
from sga_jax.weights.torch_pickle import TorchPickleFile, UnsafePickleError
from sga_jax.weights.writer import write_safetensors

__all__ = [
    "CONV2D", "LINEAR", "PICKLE_SUFFIXES", "SAFETENSORS_DTYPES", "SAME", "CheckpointError", "CheckpointReader",
    "Concat", "KeyMap", "Permute", "Rule", "SwapHalves", "TorchPickleFile", "TrailingOnes", "Transform",
    "UnsafePickleError", "check_keys", "export_specs", "export_tensors", "flat_params", "load_module", "load_state",
    "read_param", "rule", "save_state", "transcode_tensors", "write_safetensors",
]
