"""The planner (`sga_jax.plan`): target names, FLOPs counted from the program, the levers, the
per-device argument sizes against the arrays training allocates (demo config, 8 simulated
devices), a small capacity that does not fit and the overrides that make it fit, and compiles for
TPU and GPU targets (skipped unless requirements-plan.txt is installed)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from sga_jax import plan as plan_lib
from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.plan import levers, targets
from sga_jax.plan.flops import jaxpr_cost
from sga_jax.plan.step import compile_step, plan_step, trace_step
from sga_jax.train import state as state_lib
from sga_jax.train.loop import build_run
from sga_jax.train.task import get_task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import toy  # noqa: E402

INSTALL = "pip install -r requirements-plan.txt"
needs_tpu = pytest.mark.skipif(not targets.installed("libtpu"),
                               reason=f"libtpu is not installed ({INSTALL}); TPU targets cannot compile")
needs_cuda = pytest.mark.skipif(not targets.installed("jax_plugins.xla_cuda12"),
                                reason=f"the CUDA PJRT plugin is not installed ({INSTALL}); GPU targets cannot compile")
needs_cudnn = pytest.mark.skipif(not targets.installed("nvidia.cudnn"),
                                 reason=f"nvidia-cudnn-cu12 is not installed ({INSTALL}); cuDNN attention cannot trace")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """configs/demo.py with its assets in a temporary directory, as a factory of fresh configs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGA_DEMO_ASSETS", str(tmp_path_factory.mktemp("assets")))
        from configs.demo import get_config

        get_config()  # builds the assets once
        yield get_config


@pytest.mark.parametrize("name, platform, topology, slices", [
    ("h100x8", "gpu", "1x1x8", 1), ("h100x16", "gpu", "1x2x8", 1), ("2xh100x8", "gpu", "2x1x8", 2),
    ("h200x8", "gpu", "1x1x8", 1), ("a100x4", "gpu", "1x1x4", 1), ("v4-8", "tpu", "v4:2x2x1", 1),
    ("v5p-16", "tpu", "v5:2x2x2", 1), ("v5p-32", "tpu", "v5:2x2x4", 1), ("v5p-64", "tpu", "v5:2x4x4", 1),
    ("v5e-8", "tpu", "v5e:2x4", 1), ("v6e-16", "tpu", "v6e:4x4", 1), ("2xv5e-8", "tpu", "v5e:2x4", 2),
    ("cpu", "cpu", "", 1),
])
def test_targets_by_name(name, platform, topology, slices):
    """Cloud TPU names count cores (v4, v5p: two per chip) or chips (v5e, v6e); GPUs come 8 per host."""
    target = targets.get_target(name)
    assert (target.platform, target.topology, target.slices) == (platform, topology, slices)
    assert target.proxy == (platform == "cpu")


@pytest.mark.parametrize("name, message", [
    ("h100x12", "12 GPUs is not 1-8 or a multiple of 8"), ("v5p-12", "power-of-two chip count"),
    ("b9000x8", "unknown target 'b9000x8'"),
])
def test_bad_target_names_say_what_is_expected(name, message):
    with pytest.raises(ValueError, match=message):
        targets.get_target(name)


def test_gpu_descriptions_ship_with_the_package():
    h100, h200 = targets.get_target("h100x8"), targets.get_target("h200x8")
    assert h100.device_memory() == 84942979072 and h200.device_memory() == 151397597184
    usable, source = targets.usable_memory(h100, [], mem_fraction=0.75)
    assert usable == int(84942979072 * 0.75) and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75" in source


@pytest.mark.skipif(targets.installed("libtpu"), reason="libtpu is installed: nothing is missing")
def test_a_missing_backend_names_what_to_install():
    with pytest.raises(targets.BackendMissing, match="needs libtpu.*requirements-plan.txt"):
        targets.devices(targets.get_target("v5e-8"))


def test_cli_rejects_an_unknown_target_with_one_error_line():
    out = subprocess.run([sys.executable, "-m", "sga_jax.plan", "--config", "configs/toy.py", "--target", "tpu9-8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown target 'tpu9-8'")


def test_tpu_out_of_memory_messages_are_parsed():
    old = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(18.00G) exceeds available HBM (15.75G).")
    assert targets.parse_hbm_error(old) == (18 * 2**30, int(15.75 * 2**30))
    assert targets.parse_hbm_error("Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.") == (
        int(20.5 * 2**30), int(15.48 * 2**30))
    assert targets.parse_hbm_error("INTERNAL: something else") is None


class _Lowered:
    """Stands for a lowered step whose default compile fails with `message`."""

    def __init__(self, message):
        self.message, self.options = message, []

    def compile(self, compiler_options=None):
        self.options.append(compiler_options)
        if compiler_options is None:
            raise RuntimeError(self.message)
        return "compiled"


def test_compile_failures_that_are_answers():
    oom = _Lowered("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required ...\nmore")
    assert compile_step(oom, "tpu") == (None, "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                                               "required ...", None)
    tiling = _Lowered("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.423 = f32[24576,2048]")
    compiled, error, note = compile_step(tiling, "gpu")
    assert (compiled, error) == ("compiled", None) and "xla_gpu_enable_triton_gemm=false" in note
    assert tiling.options == [None, {"xla_gpu_enable_triton_gemm": False}]
    with pytest.raises(RuntimeError, match="tile sizes"):
        compile_step(_Lowered("INTERNAL: Couldn't find output tile sizes"), "tpu")


def _conv(x, w, groups=1):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def test_flops_of_a_loop_free_program_equal_xla_cost_analysis():
    def f(x, w1, w2, m):
        h = _conv(_conv(x, w1), w2, groups=4)
        return h.reshape(h.shape[0], -1) @ m

    args = (jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 16)), jnp.ones((3, 3, 4, 32)), jnp.ones((12 * 12 * 32, 24)))
    traced = jax.jit(f).trace(*args)
    xla = traced.lower().compile().cost_analysis()["flops"]
    assert jaxpr_cost(traced.jaxpr).flops == pytest.approx(xla, rel=1e-3)


def test_flops_of_convolution_gradients_follow_their_shapes():
    b, hw, cin, cout, k, groups = 2, 16, 16, 32, 3, 4
    x, w = jnp.ones((b, hw, hw, cin)), jnp.ones((k, k, cin // groups, cout))
    out = hw - k + 1
    forward = 2 * b * out * out * cout * (cin // groups) * k * k
    # input gradient: a full-padded convolution, every input element sums over cout / groups x k x k;
    # kernel gradient: every kernel element sums over the batch and the output grid.
    input_grad = 2 * b * hw * hw * cin * (cout // groups) * k * k
    kernel_grad = 2 * k * k * (cin // groups) * cout * b * out * out
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv(x, w, groups)), argnums=(0, 1))).trace(x, w)
    assert jaxpr_cost(grads.jaxpr).flops == forward + input_grad + kernel_grad


def test_flops_count_every_iteration_of_a_scan():
    layers, width, batch = 6, 64, 32

    def f(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    traced = jax.jit(f).trace(jnp.ones((layers, width, width)), jnp.ones((batch, width)))
    assert jaxpr_cost(traced.jaxpr).flops == layers * 2 * batch * width * width
    xla = traced.lower().compile().cost_analysis()["flops"]
    assert xla < 2 * 2 * batch * width * width  # XLA counts the loop body once: why the planner counts itself


def test_splash_attention_flops_count_every_grid_step_of_its_kernels():
    """JAX's splash kernels declare no cost estimate: their bodies count once per grid point. The
    forward then does XLA attention's two matmuls; the backward's two kernels recompute the logits
    (dq: 3 matmuls, dk/dv: 4), so forward + backward is 4.5 forwards where XLA's, which keeps the
    probabilities, is 3."""
    b, length, heads, dim = 2, 512, 4, 64
    q = jnp.zeros((b, length, heads, dim), jnp.bfloat16)
    forward = 4 * b * heads * length * length * dim

    def cost(implementation, grad):
        def f(q, k, v):
            return nn.attention(q, k, v, implementation=implementation).astype(jnp.float32).sum()

        program = jax.grad(f, argnums=(0, 1, 2)) if grad else f
        return jaxpr_cost(jax.make_jaxpr(program)(q, q, q)).flops

    assert cost("splash", grad=False) == cost("xla", grad=False) == forward
    assert cost("xla", grad=True) == 3 * forward
    assert cost("splash", grad=True) == pytest.approx(4.5 * forward, rel=1e-3)  # plus a small row-sum matmul


def test_levers_of_the_flux_stage_in_order(demo):
    config = demo()
    config.batch_size = 8
    task = get_task(config.task, config)
    found = levers.levers(config, task, {"data": 8, "fsdp": 1, "tensor": 1}, 8, "gpu")
    assert [name for name, _ in found] == ["remat", "FSDP width", "attention"]  # 1 example per device: no accumulation
    values = dict(found)
    assert values["remat"] == [{"model.flux.remat": p} for p in ("dots", "dots_no_batch", "full")]
    assert values["FSDP width"][-1] == {"mesh.data": -1, "mesh.fsdp": 8}
    assert values["attention"] == [{"model.attention": "cudnn"}]
    config.batch_size = 32
    accumulation = dict(levers.levers(config, task, {"data": 8, "fsdp": 1, "tensor": 1}, 8, "tpu"))
    assert accumulation["gradient accumulation"] == [{"optimizer.grad_accum_steps": k} for k in (2, 4)]
    assert accumulation["attention"] == [{"model.attention": "splash"}]  # chunked (the demo's) is the other


def test_overrides_apply_and_print_as_flags(demo):
    config = demo()
    overrides = {"model.flux.remat": "full", "optimizer.grad_accum_steps": 2, "sharding_rules.batch": ("fsdp", "data")}
    new = levers.with_overrides(config, overrides)
    assert (new.model.flux.remat, new.optimizer.grad_accum_steps) == ("full", 2)
    assert config.model.flux.remat == "none"  # the original is untouched
    assert levers.as_flags(overrides) == ("--config.model.flux.remat=full --config.optimizer.grad_accum_steps=2 "
                                          """'--config.sharding_rules.batch=("fsdp","data")'""")
    with pytest.raises(ConfigError, match="model.flux.nope"):
        levers.with_overrides(config, {"model.flux.nope": 1})


def _device_bytes(tree, device) -> int:
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


@pytest.mark.slow
def test_planned_arguments_equal_what_training_allocates(demo):
    """The demo config on 8 simulated devices (data 2 x fsdp 4): every argument part the planner
    reports for the bucket of the first real batch equals the bytes of the live arrays training
    builds on each device, and the compiled program's arguments account for all of them."""
    config = demo()
    config.batch_size, config.mesh.data, config.mesh.fsdp = 8, 2, 4
    run = build_run(config)
    state = state_lib.load_pretrained(run.task, state_lib.init_state(run.task, config, run.optimizer, run.setup),
                                      run.setup)
    frozen = state_lib.init_frozen(run.task, config, run.setup)
    batch = {k: v for k, v in next(run.task.batches(config, run.mesh, seed=0)).items() if isinstance(v, jax.Array)}
    height, width = batch["image"].shape[1:3]
    shapes = run.task.batch_shapes(config, (width, height))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in shapes.items()}
    planned = plan_step(config, targets.get_target("cpu"), (width, height), jax.devices(), usable=None)
    m = planned.memory
    for device in jax.devices():
        assert _device_bytes(state.params, device) == m.params
        assert _device_bytes(state.opt_state, device) == m.optimizer
        assert _device_bytes(frozen, device) == m.frozen
        assert _device_bytes(batch, device) == m.batch
        live = _device_bytes((state, frozen, batch), device)
        assert live == m.arguments
    assert m.params < sum(x.nbytes for x in jax.tree.leaves(state.params))  # fsdp shards some of them
    assert m.compiled_arguments + m.unused_arguments == m.arguments
    assert m.unused_arguments > 0  # the frozen VAE's decoder is not read by the step
    assert m.peak >= m.arguments and m.temporaries > 0
    assert planned.flops > 0 and planned.fits is None


def _toy_config(**fields):
    config = toy.get_config()
    config.batch_size, config.mesh.data = 8, -1
    config.toy.update(features=32, width=128, hidden=512, depth=2)
    for key, value in fields.items():
        config[key] = value
    return config


@pytest.mark.slow
def test_small_capacity_does_not_fit_and_the_suggestion_fits(tmp_path):
    """Replicated toy state over 8 devices against a capacity between the 4- and 8-way FSDP
    peaks: the plan says "does not fit", the search finds FSDP 8, and the printed flags, pasted
    into the command line, plan a step that fits."""
    config = _toy_config()
    cpu = targets.get_target("cpu")
    wide = plan_step(levers.with_overrides(config, {"mesh.data": -1, "mesh.fsdp": 8}), cpu, None, jax.devices(),
                     usable=None)
    half = plan_step(levers.with_overrides(config, {"mesh.data": -1, "mesh.fsdp": 4}), cpu, None, jax.devices(),
                     usable=None)
    assert wide.memory.peak < half.memory.peak
    capacity = (wide.memory.peak + half.memory.peak) // 2
    result = plan_lib.plan(config, cpu, [None], memory_bytes=capacity)
    bucket = result.buckets[0]
    assert bucket.plan.fits is False and bucket.plan.short_by > 0
    assert bucket.suggestion is not None
    assert bucket.suggestion.overrides == {"mesh.data": -1, "mesh.fsdp": 8}
    assert [t.plan.fits for t in bucket.trials] == [False] * (len(bucket.trials) - 1) + [True]
    text = plan_lib.render(result)
    assert "DOES NOT FIT by" in text and "first overrides that fit" in text
    flags = levers.as_flags(bucket.suggestion.overrides).split()
    overrides = [f"--config.toy.{k}={v}" for k, v in dict(config.toy).items() if k != "nan_batches"]
    cli = [sys.executable, "-m", "sga_jax.plan", "--config", "configs/toy.py", "--target", "cpu",
           "--config.batch_size=8", "--config.mesh.data=-1", *overrides, f"--memory_gib={capacity / 2**30!r}",
           "--json", *flags]
    out = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    planned = json.loads(out.stdout)
    assert planned["mesh"]["fsdp"] == 8 and planned["buckets"][0]["fits"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_tpu) for n in ("v5e-8", "v5p-16", "2xv5e-8")]
                         + [pytest.param(n, marks=needs_cuda) for n in ("h100x8", "h100x16")])
def test_tpu_and_gpu_targets_compile_a_tiny_config(name):
    """The toy step (data 2 x fsdp N) for TPU slices (one and two slices) and H100 hosts (one and
    two): it fits, the compiled arguments hold what the shardings say (TPUs pad small arrays), and
    the roofline uses the target's peak (fp32 compute: TF32 on the GPU, one bf16 pass on the TPU)."""
    target = targets.get_target(name)
    device_list = targets.devices(target)
    usable, _ = targets.usable_memory(target, device_list, mem_fraction=0.75)
    config = _toy_config()
    config.mesh.data, config.mesh.fsdp = 2, -1
    config.batch_size = 2 * len(device_list)
    planned = plan_step(config, target, None, device_list, usable=usable)
    assert planned.fits is True and 0 < planned.memory.peak < usable
    kept = planned.memory.arguments - planned.memory.unused_arguments
    if target.platform == "gpu":
        assert device_list[0].device_kind == "NVIDIA H100 80GB HBM3"
        assert planned.memory.compiled_arguments == kept
    else:
        assert planned.memory.compiled_arguments >= kept
    assert planned.step_time.peak_flops == target.peak_flops("float32") and planned.step_time.estimate_s > 0


@needs_tpu
@pytest.mark.slow
def test_tpu_compile_out_of_memory_is_a_verdict_with_a_fix():
    """The state of 2.15e9 replicated parameters (16 bytes each with AdamW and EMA: 32 GiB) cannot
    fit a v5e's 15.75 GiB: the compiler's RESOURCE_EXHAUSTED becomes "does not fit by N"; sharded
    2 ways (16 GiB) it still does not, 4 ways (the FSDP lever's next width) it does."""
    config = _toy_config()
    config.toy.update(features=8, width=32768, hidden=32768, depth=1)
    result = plan_lib.plan(config, targets.get_target("v5e-8"), [None], max_compiles=3)
    bucket = result.buckets[0]
    assert bucket.plan.fits is False and "RESOURCE_EXHAUSTED" in bucket.plan.compiler_error
    assert bucket.plan.short_by > 10 * 2**30
    assert [(t.overrides["mesh.fsdp"], t.plan.fits) for t in bucket.trials] == [(2, False), (4, True)]
    assert bucket.suggestion.plan.short_by < 0


@needs_cuda
@needs_cudnn
def test_cudnn_attention_flops_equal_chunked_attention(demo):
    """The Flux demo step traced for H100s with cuDNN's fused attention and with the chunked one:
    at 128 tokens (a whole query block, so no padded rows) both do the same matrix work."""
    device_list = targets.devices(targets.get_target("h100x8"))
    flops = {}
    for attention in ("chunked", "cudnn"):
        config = demo()
        config.batch_size, config.precision.compute_dtype = 8, "bfloat16"
        config.model.attention = attention
        step = trace_step(config, (384, 256), device_list)  # 96 image + 32 text tokens
        flops[attention] = jaxpr_cost(step.traced.jaxpr).flops
    assert flops["cudnn"] == flops["chunked"] > 0


def test_remat_strength_order_covers_every_policy():
    from sga_jax.models.nn.stack import REMAT_POLICIES

    assert sorted(levers.REMAT_BY_STRENGTH) == sorted(REMAT_POLICIES)
