"""python -m sga_jax.plan --config configs/X.py[:arg] --target TARGET [--bucket WxH ... | --all_buckets]
                        [--config.a.b=v ...] [--json] [--memory_gib G] [--mem_fraction F]
python -m sga_jax.plan --config configs/X.py --warm_cache --workdir DIR

Compiles the run's real train step ahead of time for the target (TPU slices and NVIDIA GPUs from
a machine with neither; see sga_jax.plan.targets for the names) and prints, per bucket and per
device: parameters, optimizer state, gradients, frozen models, temporaries and peak against the
usable memory, whether it fits, the FLOPs of a step and a roofline step-time estimate. When a
bucket does not fit it prints the first `--config...` overrides that make it fit.

Examples:
  python -m sga_jax.plan --config configs/flux_sga.py:sam2,long_edge=64 --target h100x8 --bucket 2048x2048 \\
      --config.model.attention=cudnn --config.data.caption_cache=cache/
  python -m sga_jax.plan --config configs/flux_sga.py:sam2 --target v5p-16 --all_buckets --json
  python -m sga_jax.plan --config configs/demo.py --target cpu --memory_gib 0.5

--warm_cache compiles every bucket on this machine's own devices into the run's persistent
compilation cache (WORKDIR/compilation_cache unless the config says otherwise), so the training
run that follows loads its step instead of compiling it; launch it like the training command
(on every host of a multi-host run).
Exit status: 0 when every planned bucket fits (or there is no limit to judge by); 1 when one does
not; 2 for a config, target or flag that cannot work.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from sga_jax import cli
from sga_jax.errors import ConfigError, UsageError

CPU_DEVICES = 8  # simulated devices of the cpu target unless --cpu_devices says otherwise


def define_flags() -> flags.FlagValues:
    """The command's flags (defined afresh for every run)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/X.py[:arg]).", lock_config=True,
                                    flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)
    flags.DEFINE_string("target", "cpu", "h100x8, h200x8, h100x16, v5p-16, v5e-8, v6e-8, v4-8, 2xv5e-8, "
                        "cpu (simulated devices: a weak proxy), local (this machine's devices), ...", flag_values=fv)
    flags.DEFINE_multi_string("bucket", [], "Bucket WIDTHxHEIGHT to plan (repeatable); default: the config's "
                              "bucket with the most pixels.", flag_values=fv)
    flags.DEFINE_bool("all_buckets", False, "Plan every bucket of the config's data section.", flag_values=fv)
    flags.DEFINE_bool("json", False, "Print the plan as JSON on stdout (progress stays on stderr).", flag_values=fv)
    flags.DEFINE_float("mem_fraction", float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)),
                       "GPU targets: the share of device memory JAX may take "
                       "(default: $XLA_PYTHON_CLIENT_MEM_FRACTION, else JAX's 0.75).", flag_values=fv)
    flags.DEFINE_float("memory_gib", None, "Judge against this many GiB per device instead of the target's.",
                       flag_values=fv)
    flags.DEFINE_bool("suggest", True, "Search remat / accumulation / FSDP / attention when a bucket does not fit.",
                      flag_values=fv)
    flags.DEFINE_integer("max_compiles", 6, "At most this many extra compiles per bucket when searching.",
                         flag_values=fv)
    flags.DEFINE_integer("cpu_devices", CPU_DEVICES, "Simulated devices of the cpu target.", flag_values=fv)
    flags.DEFINE_bool("warm_cache", False, "Compile every bucket on this machine into the run's compilation cache.",
                      flag_values=fv)
    flags.DEFINE_string("workdir", None, "The run's work directory (for --warm_cache).", flag_values=fv)
    return fv


class Progress:
    """Progress lines on stderr with the elapsed time; a long step (a 12B compile) is re-announced
    every `every` seconds so a quiet terminal is not taken for a hang."""

    def __init__(self, every: float = 30.0):
        self.start = self.since = time.perf_counter()
        self.message = ""
        self.every = every
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _print(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {text}", file=sys.stderr, flush=True)

    def __call__(self, message: str) -> None:
        self.message, self.since = message, time.perf_counter()
        self._print(message)

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.every)
            if self.message and time.perf_counter() - self.since >= self.every:
                self._print(f"... still at: {self.message} ({time.perf_counter() - self.since:.0f} s)")


def _flag_in(argv: Sequence[str], name: str) -> str | None:
    """The value of --name=V / --name V in `argv` ("" for a bare boolean --name), else None."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            following = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if following.startswith("-") else following
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _select_backend(argv: Sequence[str]) -> None:
    """Before the config file loads (it may run JAX): compile on the CPU client, which deviceless
    GPU / TPU topologies need, with --cpu_devices simulated devices unless XLA_FLAGS sets a count;
    a local target (and --warm_cache) keeps this machine's backend."""
    import jax

    target = (_flag_in(argv, "target") or "cpu").strip().lower()
    if target == "local" or _flag_in(argv, "warm_cache") in ("", "true", "1"):
        return
    jax.config.update("jax_platforms", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", int(_flag_in(argv, "cpu_devices") or CPU_DEVICES))


def _main(fv: flags.FlagValues, args: list[str]) -> int:
    config = fv.config
    if fv.warm_cache and not fv.workdir:
        raise UsageError("--warm_cache needs --workdir (the cache lives in the run's work directory)")
    if fv.warm_cache and fv.target not in ("cpu", "local"):
        raise UsageError(f"--warm_cache compiles for this machine's devices (the cache holds executables for "
                         f"them); drop --target={fv.target} and run it where the training runs")
    from sga_jax import parallel
    from sga_jax.plan import planner, report, targets
    from sga_jax.train import compile_cache

    cli.log_to_stderr()
    if fv.warm_cache:
        parallel.initialize_distributed()  # a multi-host run's step compiles on all of its processes
    progress = Progress()
    memory = None if fv.memory_gib is None else int(fv.memory_gib * 2**30)
    target = targets.get_target("local" if fv.warm_cache else fv.target)
    buckets = planner.choose_buckets(config, fv.bucket, fv.all_buckets or fv.warm_cache)
    cache = compile_cache.cache_directory(config, fv.workdir) if fv.warm_cache else None
    if fv.warm_cache and cache is None:
        raise ConfigError("config.compilation_cache.enabled is False: there is no cache to warm")
    with compile_cache.persistent_cache(cache) if fv.warm_cache else contextlib.nullcontext():
        result = planner.plan(config, target, buckets, mem_fraction=fv.mem_fraction, memory_bytes=memory,
                              suggest=fv.suggest and not fv.warm_cache, max_compiles=fv.max_compiles,
                              progress=progress)
    if fv.json:
        print(json.dumps(report.as_dict(result), indent=2), flush=True)
    else:
        print(report.render(result, label=str(config.task)), flush=True)
    if fv.warm_cache:
        print(f"compiled {len(buckets)} bucket(s) into {cache}", flush=True)
    return 1 if any(b.plan.fits is False for b in result.buckets) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m sga_jax.plan` and the `sga-plan` console script; returns the exit status."""
    _select_backend(sys.argv[1:] if argv is None else argv)
    return cli.run_with_flags(_main, argv, define=define_flags, doc=__doc__, configs=("config",))


if __name__ == "__main__":
    sys.exit(main())
