"""configs/demo.py at test size, shared by the stage-2 tests (conftest.py registers the fixture)."""

import pytest

IMAGE = 128  # F16 latent 8 x 8 -> 4 x 4 Flux tokens -> 2 x 2 after the stride-2 head


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
    """`make(row=None, **{"dotted.key": value})`: the demo config with IMAGE-square images, batch 2
    and a 2 x 2 prior grid, its assets in a temporary directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGA_DEMO_ASSETS", str(tmp_path_factory.mktemp("assets")))
        from configs.demo import get_config

        def make(arg=None, **overrides):
            config = get_config(arg)
            config.data.buckets.fixed = f"{IMAGE}x{IMAGE}"
            config.align.long_edge = 2
            config.batch_size = 2
            config.update_from_flattened_dict(overrides)
            return config

        yield make
