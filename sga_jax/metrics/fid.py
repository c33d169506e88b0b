"""FID (Heusel et al. 2017): the Fréchet distance between the 2048-d pool features of the FID
InceptionV3 (`sga_jax.models.inception`) of two image sets, under a named input protocol
(`inception.PROTOCOLS`; the default, "diffusion-4k", is the SGA paper's).

`inception_features` maps a batch of images to features; `InceptionStatistics` streams any number
of images of any sizes into `FeatureStatistics` (float64 mean and covariance), running the network
on batches of one fixed size (the last one padded) so that it compiles once; its
`frechet_distance` against another set's statistics is the FID.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.metrics.frechet import FeatureStatistics
from sga_jax.models import inception


@functools.partial(jax.jit, static_argnames="protocol")
def _prepare(images: jax.Array, protocol: str) -> jax.Array:
    return inception.inception_input(images, protocol)


@functools.partial(jax.jit, static_argnums=0)
def _pool_features(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)


def inception_features(model: inception.InceptionV3, images: jax.Array, *,
                       protocol: str = inception.DEFAULT_PROTOCOL) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> FID Inception pool features (B, 2048) under `protocol`."""
    inception.check_protocol(protocol)
    graphdef, state = nnx.split(model)
    return _pool_features(graphdef, state, _prepare(jnp.asarray(images), protocol))


class InceptionStatistics:
    """Streaming FID statistics of an image set.

    `add(images)` takes batches (B, H, W, 3) in [-1, 1] of any size; each is brought to the
    Inception input under `protocol` (compiled once per input size) and queued; the network runs on
    `batch_size` inputs at a time. `finish()` runs the remainder (zero-padded to `batch_size`, the
    padding's features dropped) and returns the `FeatureStatistics`.
    """

    def __init__(self, model: inception.InceptionV3, *, protocol: str = inception.DEFAULT_PROTOCOL,
                 batch_size: int = 16):
        inception.check_protocol(protocol)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.protocol, self.batch_size = protocol, batch_size
        self._graphdef, self._state = nnx.split(model)
        self._queue: list[jax.Array] = []
        self._queued = 0
        self.statistics = FeatureStatistics(inception.FEATURES)

    def add(self, images: jax.Array | np.ndarray) -> None:
        """Queue a batch of images, running the network on every full batch."""
        self._queue.append(_prepare(jnp.asarray(images), self.protocol))
        self._queued += self._queue[-1].shape[0]
        while self._queued >= self.batch_size:
            self._run(self.batch_size)

    def _run(self, count: int) -> None:
        inputs = jnp.concatenate(self._queue)
        batch, rest = inputs[:count], inputs[count:]
        if count < self.batch_size:
            batch = jnp.pad(batch, ((0, self.batch_size - count), (0, 0), (0, 0), (0, 0)))
        features = _pool_features(self._graphdef, self._state, batch)[:count]
        self.statistics.update(np.asarray(features))
        self._queue = [rest] if rest.shape[0] else []
        self._queued = rest.shape[0]

    def finish(self) -> FeatureStatistics:
        """Run what is queued and return the statistics of every image added."""
        if self._queued:
            self._run(self._queued)
        return self.statistics
