"""Weights in and out, shared by every model family.

- `reader`: `CheckpointReader`, a name -> tensor view of safetensors files read one tensor at a
  time (numpy framework, bf16 through ml_dtypes, no torch)
- `writer`: `write_safetensors`, streaming and atomic, sharded with an index when large
- `keymap`: the key maps (`Rule`, transforms) that families' `convert.py` tables are made of, and
  `load_state` / `save_state` / `transcode_tensors` that apply them both ways
- `converted`: directories written by `python -m sga_jax.convert`, and the family registry

Pickle checkpoints are refused: unpickling runs arbitrary code.
"""

from sga_jax.weights.keymap import (
    CONV2D, LINEAR, SAME, Concat, FoldedBatchNormBias, FoldedBatchNormKernel, KeyMap, Permute, Rule, SwapHalves,
    TrailingOnes, Transform, check_keys, export_specs, export_tensors, flat_params, load_module, load_state,
    read_param, rule, save_state, transcode_tensors,
)
from sga_jax.weights.reader import (
    PICKLE_SUFFIXES, SAFETENSORS_DTYPES, CheckpointError, CheckpointReader, refuse_pickle,
)
from sga_jax.weights.writer import write_safetensors

__all__ = [
    "CONV2D", "LINEAR", "PICKLE_SUFFIXES", "SAFETENSORS_DTYPES", "SAME", "CheckpointError", "CheckpointReader",
    "Concat", "FoldedBatchNormBias", "FoldedBatchNormKernel", "KeyMap", "Permute", "Rule", "SwapHalves",
    "TrailingOnes", "Transform", "check_keys", "export_specs", "export_tensors", "flat_params", "load_module", "load_state", "read_param",
    "refuse_pickle", "rule", "save_state", "transcode_tensors", "write_safetensors",
]
