"""Test-session setup: 8 simulated CPU devices on the CPU backend (set before jax is imported), the
torchvision stub (tests/stubs/sitecustomize.py, for this process and every subprocess), one
persistent compilation cache for the session and shared fixtures."""

import atexit
import os
import runpy
import shutil
import tempfile
from pathlib import Path

STUBS = Path(__file__).parent / "stubs"
runpy.run_path(str(STUBS / "sitecustomize.py"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(STUBS), os.environ.get("PYTHONPATH"))))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CPU backend even where a GPU or TPU plugin is installed (requirements-plan.txt): the planner's
# GPU topologies compile without a GPU only on the CPU client, and the suite is a CPU suite.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # where libtpu is installed, test processes load it side by side
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One compilation cache for the whole session (the xdist workers inherit it from the controller):
# the many tests that build the same tiny run compile its programs once. Each training run reads
# it through config.compilation_cache (sga_jax.train.compile_cache); tests of the cache itself
# unset it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sga-jax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


from demo_fixtures import demo_config  # noqa: E402,F401  (the stage-2 tests' shared fixture)
from stage1_fixtures import stage_config  # noqa: E402,F401  (the stage-1 tests' shared fixture)
