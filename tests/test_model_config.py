"""The config base every model family shares: JSON round trip and run-setting checks."""

import dataclasses
import json

import pytest

from sga_jax.models import clip, dinov2, dinov3, flux, lpips, sam2, t5, vae


def test_model_configs_round_trip_through_json_and_check_run_settings():
    """Every family's config: to_dict -> JSON -> from_dict is the identity; bad run settings and
    unknown fields are refused with the class and field named."""
    configs = [flux.FluxConfig.dev(), vae.AutoEncoderConfig.flux_f16(), dinov2.Dinov2Config.vitb14(registers=True),
               dinov3.Dinov3Config.vitb16(), sam2.Sam2HieraConfig.base_plus(), t5.T5Config.xxl(), clip.ClipTextConfig.vit_l_14(),
               lpips.LPIPSConfig()]
    for config in configs:
        cls = type(config)
        assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        with pytest.raises(ValueError, match=f"{cls.__name__}.*unknown fields"):
            cls.from_dict({**config.to_dict(), "nonsense": 1})
        for field, value in (("remat", "sometimes"), ("attention", "flash"), ("dtype", "float13")):
            if not hasattr(config, field):  # a conv net (LPIPS) has no attention or remat setting
                continue
            with pytest.raises(ValueError, match=f"{cls.__name__}.*{field} '{value}'"):
                dataclasses.replace(config, **{field: value})


@pytest.mark.parametrize("config", [t5.T5Config.xxl(), clip.ClipTextConfig.vit_l_14()])
def test_text_encoders_refuse_chunked_attention_which_takes_no_mask(config):
    with pytest.raises(ValueError, match=f"{type(config).__name__}.*attention 'chunked'"):
        dataclasses.replace(config, attention="chunked")
