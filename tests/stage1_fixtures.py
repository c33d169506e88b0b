"""configs/demo_vae.py at test size, shared by the stage-1 tests (conftest.py registers the fixture)."""

import pytest

IMAGE = 32  # F16 latents 2 x 2; DINOv2 (patch 14) at 2 x 14 = 28 px


@pytest.fixture(scope="module")
def stage_config(tmp_path_factory):
    """`make(row=None, **{"dotted.key": value})`: the stage-1 demo config with IMAGE-square images,
    batch 2, a small PatchGAN on from step 0 and a 2 x 2 prior grid, its assets in a temporary
    directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGA_DEMO_ASSETS", str(tmp_path_factory.mktemp("assets")))
        from configs.demo_vae import get_config

        def make(arg=None, **overrides):
            config = get_config(arg)
            config.data.buckets.fixed = f"{IMAGE}x{IMAGE}"
            config.eval.size = IMAGE
            config.align.long_edge = 2
            config.batch_size = 2
            config.model.disc.ndf = 8
            config.loss.gan.start = 0
            config.update_from_flattened_dict(overrides)
            return config

        yield make
