"""The Flux sampler against BFL's formulas written out here in torch, driving diffusers' model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flux_reference import save_reference, tiny_reference
from torch_reference import assert_close_relative, nchw_to_nhwc, nhwc_to_nchw, to_numpy

from sga_jax import sample
from sga_jax.models import flux


def bfl_pack(img: torch.Tensor) -> torch.Tensor:
    """BFL: rearrange(img, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)."""
    b, c, h, w = img.shape
    return img.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def bfl_unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """BFL: rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=ceil(H/16), w=ceil(W/16), ph=2, pw=2)."""
    b, _, f = x.shape
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    return x.view(b, h, w, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, 2 * h, 2 * w)


def bfl_img_ids(bs: int, h: int, w: int) -> torch.Tensor:
    """BFL's prepare(): ids (0, row, col) of the packed grid of an h x w latent."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(1, -1, 3).repeat(bs, 1, 1)


def bfl_schedule(num_steps: int, image_seq_len: int, base_shift=0.5, max_shift=1.15, shift=True) -> list[float]:
    """BFL's get_schedule with get_lin_function and time_shift."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        m = (max_shift - base_shift) / (4096 - 256)
        mu = m * image_seq_len + (base_shift - m * 256)
        timesteps = math.exp(mu) / (math.exp(mu) + (1 / timesteps - 1) ** 1.0)
    return timesteps.tolist()


def test_pack_unpack_and_ids_match_bfl():
    latents = np.random.default_rng(0).normal(size=(2, 6, 10, 16)).astype(np.float32)
    packed = sample.pack(jnp.asarray(latents))
    np.testing.assert_array_equal(np.asarray(packed), to_numpy(bfl_pack(nhwc_to_nchw(latents))))
    back = bfl_unpack(torch.from_numpy(np.array(packed)), 48, 80)
    np.testing.assert_array_equal(np.asarray(sample.unpack(packed, 6, 10)), nchw_to_nhwc(back))
    np.testing.assert_array_equal(np.asarray(sample.image_ids(2, 6, 10)), to_numpy(bfl_img_ids(2, 6, 10)))
    assert sample.text_ids(2, 7).shape == (2, 7, 3) and not np.asarray(sample.text_ids(2, 7)).any()
    assert sample.noise(jax.random.key(0), 3, 100, 130).shape == (3, 14, 18, 16)
    with pytest.raises(ValueError, match="even sides"):
        sample.pack(jnp.zeros((1, 5, 4, 16)))


@pytest.mark.parametrize("steps,seq_len,shift", [(4, 12, True), (50, 4096, True), (28, 1024, True), (4, 4096, False)])
def test_time_schedule_matches_bfl(steps, seq_len, shift):
    ours = sample.time_schedule(steps, seq_len, shift=shift)
    theirs = np.asarray(bfl_schedule(steps, seq_len, shift=shift), np.float32)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and np.all(np.diff(ours) < 0)


def test_four_step_sampling_matches_a_bfl_euler_loop_on_diffusers(tmp_path):
    reference = tiny_reference(guidance=True, seed=1)
    model = flux.load(save_reference(reference, tmp_path))
    height, width, steps, guidance = 48, 64, 4, 3.5  # 6 x 8 latent, 3 x 4 tokens
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(2, 6, 8, 4)).astype(np.float32)
    txt = rng.normal(size=(2, 5, 24)).astype(np.float32)
    y = rng.normal(size=(2, 12)).astype(np.float32)

    img = bfl_pack(nhwc_to_nchw(latents))
    img_ids = bfl_img_ids(2, 6, 8)[0]
    txt_ids = torch.zeros(5, 3)
    timesteps = bfl_schedule(steps, img.shape[1])
    guidance_vec = torch.full((2,), guidance)
    with torch.no_grad():
        for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
            pred = reference(
                hidden_states=img,
                encoder_hidden_states=torch.from_numpy(txt),
                pooled_projections=torch.from_numpy(y),
                timestep=torch.full((2,), t_curr),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance_vec,
            ).sample
            img = img + (t_prev - t_curr) * pred
    expected = nchw_to_nhwc(bfl_unpack(img, height, width))

    ours = sample.sample_latents(
        model, jnp.asarray(txt), jnp.asarray(y), height=height, width=width, steps=steps, guidance=guidance,
        latents=jnp.asarray(latents),
    )
    assert ours.shape == (2, 6, 8, 4)
    assert_close_relative(np.asarray(ours), expected, 1e-4, "4-step Euler latents")
    assert np.abs(expected - latents).max() > 0.1, "sampling should move the latents"

    drawn = sample.sample_latents(model, jnp.asarray(txt), jnp.asarray(y), height=height, width=width, steps=1,
                                  key=jax.random.key(0))
    assert drawn.shape == (2, 6, 8, 4) and np.isfinite(np.asarray(drawn)).all()
