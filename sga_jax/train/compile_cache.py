"""JAX's persistent compilation cache for training: a restart (after preemption, a crash or a new
allocation) loads the executables an earlier start compiled instead of compiling a 12B step again.

On by default, in `WORKDIR/compilation_cache` (the config's `compilation_cache` section):

    compilation_cache.enabled    False switches the cache off for the run
    compilation_cache.directory  another directory ("" = $JAX_COMPILATION_CACHE_DIR when set, else
                                 WORKDIR/compilation_cache); hosts of a multi-host run may share it

Every executable is cached, however fast it compiled. `python -m sga_jax.plan --warm_cache` fills
the same directory ahead of a run. The cache is trusted: do not share a directory with users you
do not trust (see JAX's documentation of `jax.experimental.compilation_cache`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")


def default_config() -> ml_collections.ConfigDict:
    """The `compilation_cache` section of a training config."""
    return ml_collections.ConfigDict({"enabled": True, "directory": ""})


def cache_directory(config: ml_collections.ConfigDict, workdir: str | Path) -> Path | None:
    """Where the run's executables are cached, or None when the config switches the cache off."""
    section = config.get("compilation_cache", default_config())
    if not section.enabled:
        return None
    directory = section.directory or os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    return Path(directory) if directory else Path(workdir).absolute() / "compilation_cache"


@contextlib.contextmanager
def persistent_cache(directory: Path | None) -> Iterator[None]:
    """Within the block, compiled executables are read from and written to `directory` (None:
    the persistent cache is off); JAX's previous cache settings are restored afterwards."""
    previous = {name: getattr(jax.config, name) for name in _SETTINGS}
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # JAX opens its cache once: make it open this directory
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
