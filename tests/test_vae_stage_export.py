"""A stage-1 run end to end on the tiny demo config: train through the engine (checkpoint, eval,
the feature-drift probe on the encoder's latents, reconstruction grids), export the F16 VAE to diffusers and BFL files, load the diffusers file
strictly in AutoencoderKL and run it in the F16 form with the recipe of docs/training.md, read both
back with our loader, and train stage 2 against the exported directory."""

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx

from sga_jax.models import vae
from sga_jax.stages import probe
from sga_jax.train import loop, state as state_lib
from sga_jax.train.checkpoint import Checkpointer
from sga_jax.train.export import export_run
from torch_reference import assert_close_relative, nchw_to_nhwc, nhwc_to_nchw

IMAGE = 32


def run_f16_in_diffusers(model: AutoencoderKL) -> AutoencoderKL:
    """docs/training.md's recipe, word for word: an exported F16 VAE in diffusers' stock AutoencoderKL."""
    model.encoder.conv_in.stride = (2, 2)  # F16: the encoder's first conv at stride 2
    model.decoder.conv_out.register_forward_pre_hook(  # and a nearest 2x upsample before the decoder's last conv
        lambda module, args: (torch.nn.functional.interpolate(args[0], scale_factor=2, mode="nearest"),))
    return model


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three steps of the tiny stage-1 config (GAN on from step 1), then its diffusers and BFL exports."""
    folder = tmp_path_factory.mktemp("stage1_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGA_DEMO_ASSETS", str(folder / "assets"))
        from configs.demo_vae import get_config

        config = get_config()
    config.data.buckets.fixed = f"{IMAGE}x{IMAGE}"
    config.eval.size = IMAGE
    config.align.long_edge = 2
    config.batch_size = 2
    config.model.disc.ndf = 8
    config.update(total_steps=3, checkpoint_every=3, log_every=1, sample_every=3, eval_every=3)
    config.loss.gan.start = 1
    config.logging.progress_bar = False
    workdir = folder / "run"
    run = loop.build_run(config, jax.devices()[:1])
    loop.train(config, workdir, run=run)
    assert export_run(workdir, folder / "diffusers", format="diffusers") == 3
    export_run(workdir, folder / "ae.safetensors", format="bfl")
    target = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
    state, _, _, _ = Checkpointer(workdir / "checkpoints").restore(3, target)
    return folder, workdir, jax.device_get(state.params["ae"])


def test_run_logs_every_term_and_writes_grids(trained):
    import json

    _, workdir, _ = trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in rows] == [1, 2, 3]  # after the probe's step-0 record
    for name in ("loss_rec", "loss_lpips", "loss_g", "loss_d", "loss_moment", "loss_sc", "loss_sga", "lambda_adv",
                 "lambda_sga", "lr_disc"):
        assert name in rows[-1], name
    assert rows[0]["loss_g"] == 0.0 and rows[1]["loss_d"] > 0  # the GAN starts at step index 1
    assert {"eval_psnr", "eval_ssim", "eval_lpips"} <= set(rows[-1])
    assert (workdir / "samples" / "step_000003.png").is_file() and (workdir / "loss_curve.png").is_file()


def test_probe_follows_the_encoder_latents_from_step_0(trained):
    """The probe's batch, the pre-trained posterior means (F16 latents 2 x 2 x 16) and their
    reconstructions; zero drift at step 0 (the identical reconstruction's PSNR, infinite, is left
    out), drift after three steps."""
    import json

    _, workdir, _ = trained
    evals = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if "eval_drift_coord" in r}
    assert sorted(evals) == [0, 3]
    assert {f"eval_{name}" for name in probe.METRICS} <= set(evals[0]) and "eval_output_psnr" not in evals[0]
    assert {f"eval_{name}" for name in {**probe.METRICS, **probe.IMAGE_METRICS}} <= set(evals[3])
    assert evals[0]["eval_drift_coord"] == evals[0]["eval_drift_output"] == 0.0
    assert evals[0]["eval_drift_structure"] < 1e-6
    assert evals[0]["eval_prior_gram"] > 0
    assert evals[3]["eval_drift_coord"] > 0 and np.isfinite(evals[3]["eval_output_psnr"])
    examples = np.load(workdir / "probe" / "batch.npz", allow_pickle=False)
    assert examples.files == ["image"] and examples["image"].shape == (2, IMAGE, IMAGE, 3)
    reference = np.load(workdir / "probe" / "reference.npz", allow_pickle=False)
    assert reference["features"].shape == (2, 2, 2, 16) and reference["output"].shape == (2, IMAGE, IMAGE, 3)


def test_diffusers_export_loads_strictly_and_runs_as_f16(trained):
    folder, _, params = trained
    model, info = AutoencoderKL.from_pretrained(folder / "diffusers", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    np.testing.assert_array_equal(model.decoder.conv_out.weight.detach().numpy(),
                                  np.asarray(params["decoder"]["conv_out"]["kernel"]).transpose(3, 2, 0, 1))
    ours = vae.load(folder / "diffusers")
    assert ours.config.f16 and ours.config.downsample_factor == 16
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(ours, nnx.Param))):
        expected = params
        for key in path:
            expected = expected[key.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=jax.tree_util.keystr(path))
    bfl = vae.load(folder / "ae.safetensors")
    assert bfl.config == ours.config

    f16 = run_f16_in_diffusers(model.eval())
    images = np.random.default_rng(0).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
    with torch.no_grad():
        dist = f16.encode(nhwc_to_nchw(images)).latent_dist
        decoded = f16.decode(dist.mean).sample
    graphdef, state = nnx.split(ours)
    mean, _ = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_moments(x))(state, images)
    assert_close_relative(mean, nchw_to_nhwc(dist.mean), 1e-4, "F16 encode in diffusers")
    ours_decoded = jax.jit(lambda s, z: nnx.merge(graphdef, s).decoder(z))(state, np.asarray(mean))
    assert_close_relative(ours_decoded, nchw_to_nhwc(decoded), 1e-4, "F16 decode in diffusers")


def test_stage2_trains_against_the_exported_vae(trained, tmp_path):
    folder, _, params = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGA_DEMO_ASSETS", str(folder / "assets"))
        from configs.demo import get_config

        config = get_config()
    config.model.vae.weights = str(folder / "diffusers")
    config.data.buckets.fixed = "128x128"  # F16 latents 8 x 8, Flux tokens 4 x 4, the stride-2 head 2 x 2
    config.align.long_edge = 2
    config.update(total_steps=2, checkpoint_every=2, log_every=1, sample_every=0, batch_size=2)
    config.logging.progress_bar = False
    run = loop.build_run(config, jax.devices()[:1])
    assert run.task.networks.vae.f16
    result = loop.train(config, tmp_path / "stage2", run=run)
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    frozen = state_lib.init_frozen(run.task, config, run.setup)
    np.testing.assert_array_equal(np.asarray(frozen.module["vae"]["decoder"]["conv_out"]["kernel"]),
                                  np.asarray(params["decoder"]["conv_out"]["kernel"]))
