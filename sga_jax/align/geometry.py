"""A small toolkit for the geometry of the SGA loss (the paper's Appendix A), on single examples.

Every function takes unbatched token matrices X (N, Cx) and Y (N, Cy) (`jax.vmap` them for
batches); the proposition checks L2-normalise rows first, exactly as the loss does, and return the
two sides of the inequality they state so callers can test or plot them.

* Prop. 1 (gauge invariance): `gauge_invariance_gap` = |L_SGA(X Q, Y) - L_SGA(X, Y)| for orthogonal Q.
* Prop. 2 (spectra and subspaces): `spectral_bound` (Hoffman-Wielandt) and `subspace_bound`
  (Davis-Kahan, Yu-Wang-Samworth form), built on `gram_spectra` and `principal_angles`.
* Prop. 3 (containment): `containment` gives (L_SGA, 4 L_REPA) with L_SGA <= 4 L_REPA;
  `zero_set_distances` gives how far X must move to reach each loss's zero set: ||X - Y||_F for
  REPA, the orthogonal-Procrustes orbit distance min_Q ||X - Y Q||_F for SGA.

The feature-drift probe of the training stages (`sga_jax.stages.probe`) measures a run with the
same functions, comparing features X_t with the pre-trained X_0 and the prior's Y:
`coordinate_drift` (||X_t - X_0|| / ||X_0||), `zero_set_distances(X_t, X_0)` (the same move with
Q = I, and the orbit drift min_Q), `gram_distance` (||G_X - G_Y||_F / N), `eigenvalue_gap` (its
top-k spectral part, never larger: Prop. 2(i)) and `principal_angles`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sga_jax.align.sga import NORM_EPS, normalize_rows, sga_loss

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_matrix(name: str, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty (tokens, channels) matrix, got shape {tuple(x.shape)}")
    return x


def _check_pair(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, y = _check_matrix("x", x), _check_matrix("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of tokens: x {tuple(x.shape)} vs y {tuple(y.shape)}")
    return x, y


def _gram(x: jax.Array) -> jax.Array:
    return jnp.matmul(x, x.T, precision=_HIGHEST)


def procrustes(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Orthogonal Procrustes: the Q with orthonormal rows minimising ||X - Y Q||_F, and that minimum.

    X is (N, Cx), Y is (N, Cy) with Cy <= Cx (Q is (Cy, Cx); square orthogonal when Cy == Cx).
    With Y^T X = U S V^T, Q = U V^T. The distance is evaluated as ||X - Y Q||_F directly rather
    than as ||X||^2 + ||Y||^2 - 2 sum(S), which cancels near the orbit. Rows are used as given.
    """
    x, y = _check_pair(x, y)
    if y.shape[1] > x.shape[1]:
        raise ValueError(
            f"procrustes needs y no wider than x (Q has orthonormal rows): x {tuple(x.shape)} vs y {tuple(y.shape)}"
        )
    u, _, vt = jnp.linalg.svd(jnp.matmul(y.T, x, precision=_HIGHEST), full_matrices=False)
    q = jnp.matmul(u, vt, precision=_HIGHEST)
    return q, jnp.linalg.norm(x - jnp.matmul(y, q, precision=_HIGHEST))


def orbit_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """min over Q with orthonormal rows of ||X - Y Q||_F: the distance from X to the orbit {Y Q}."""
    return procrustes(x, y)[1]


def gram_spectra(x: jax.Array, y: jax.Array, *, eps: float = NORM_EPS) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues of the two spatial Gram matrices (row-normalised), descending, zero-padded to one length.

    The nonzero eigenvalues of G = X X^T are the squared singular values of X, so the length is
    min(N, max(Cx, Cy)); the N x N matrices are never formed. The remaining eigenvalues are zero.
    """
    x, y = _check_pair(x, y)
    length = min(x.shape[0], max(x.shape[1], y.shape[1]))

    def spectrum(m: jax.Array) -> jax.Array:
        s = jnp.linalg.svd(normalize_rows(m, eps), compute_uv=False)
        return jnp.pad(s * s, (0, length - s.shape[0]))

    return spectrum(x), spectrum(y)


def top_eigenspace(x: jax.Array, k: int, *, eps: float = NORM_EPS) -> jax.Array:
    """(N, k) orthonormal basis of the top-k eigenspace of the row-normalised Gram X X^T."""
    x = _check_matrix("x", x)
    if not 1 <= k <= min(x.shape):
        raise ValueError(f"k must be in [1, min(N, C)] = [1, {min(x.shape)}] for x {tuple(x.shape)}, got {k}")
    u, _, _ = jnp.linalg.svd(normalize_rows(x, eps), full_matrices=False)
    return u[:, :k]


def principal_angles(x: jax.Array, y: jax.Array, k: int, *, eps: float = NORM_EPS) -> jax.Array:
    """Principal angles (radians, ascending) between the top-k eigenspaces of G_X and G_Y.

    Small angles come from the sines (singular values of U_y - U_x U_x^T U_y), large ones from the
    cosines (singular values of U_x^T U_y), as in Knyazev and Argentati (2002): arccos alone loses
    half the digits near zero.
    """
    x, y = _check_pair(x, y)
    ux, uy = top_eigenspace(x, k, eps=eps), top_eigenspace(y, k, eps=eps)
    overlap = jnp.matmul(ux.T, uy, precision=_HIGHEST)
    cosines = jnp.linalg.svd(overlap, compute_uv=False)  # descending: angles ascending
    sines = jnp.linalg.svd(uy - jnp.matmul(ux, overlap, precision=_HIGHEST), compute_uv=False)[::-1]
    from_cos = jnp.arccos(jnp.clip(cosines, -1.0, 1.0))
    from_sin = jnp.arcsin(jnp.clip(sines, 0.0, 1.0))
    return jnp.where(from_sin < jnp.pi / 4, from_sin, from_cos)


def gauge_invariance_gap(x: jax.Array, y: jax.Array, q: jax.Array, *, eps: float = NORM_EPS) -> jax.Array:
    """Prop. 1: |L_SGA(X Q, Y) - L_SGA(X, Y)| for an orthogonal (Cx, Cx) matrix Q; zero up to rounding."""
    x, y = _check_pair(x, y)
    q = jnp.asarray(q)
    if q.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"q must be ({x.shape[1]}, {x.shape[1]}) for x {tuple(x.shape)}, got {tuple(q.shape)}")
    rotated = jnp.matmul(x, q, precision=_HIGHEST)
    after = sga_loss(rotated[None], y[None], method="gram", eps=eps)
    before = sga_loss(x[None], y[None], method="gram", eps=eps)
    return jnp.abs(after - before)


def coordinate_drift(x: jax.Array, x0: jax.Array) -> jax.Array:
    """||X - X_0||_F / ||X_0||_F: how far features moved in their own coordinates, relative to their
    size (what patch-wise alignment forces). Rows are used as given; X and X_0 have equal shapes."""
    x, x0 = _check_pair(x, x0)
    if x.shape != x0.shape:
        raise ValueError(f"coordinate drift needs equal shapes: x {tuple(x.shape)} vs x0 {tuple(x0.shape)}")
    return jnp.linalg.norm(x - x0) / jnp.linalg.norm(x0)


def gram_distance(x: jax.Array, y: jax.Array, *, eps: float = NORM_EPS) -> jax.Array:
    """||G_X - G_Y||_F / N of the row-normalised features: sqrt(L_SGA), in [0, 2).

    Computed through the N x N Gram matrices, so it is exactly zero for X == Y (the O(N C^2)
    channel identity would cancel to rounding noise there).
    """
    x, y = _check_pair(x, y)
    return jnp.sqrt(sga_loss(x[None], y[None], method="gram", eps=eps))


def eigenvalue_gap(x: jax.Array, y: jax.Array, k: int, *, eps: float = NORM_EPS) -> jax.Array:
    """||lambda_1..k(G_X) - lambda_1..k(G_Y)||_2 / N: the top-k spectra of the two spatial Grams
    (row-normalised, descending) apart. Never above `gram_distance` (Prop. 2(i), Hoffman-Wielandt)."""
    x, y = _check_pair(x, y)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, N] = [1, {x.shape[0]}] for x {tuple(x.shape)}, got {k}")
    lam_x, lam_y = gram_spectra(x, y, eps=eps)
    return jnp.linalg.norm(lam_x[:k] - lam_y[:k]) / x.shape[0]


def gram_difference(x: jax.Array, y: jax.Array, *, eps: float = NORM_EPS) -> jax.Array:
    """G_X - G_Y (N, N) of the row-normalised features."""
    x, y = _check_pair(x, y)
    return _gram(normalize_rows(x, eps)) - _gram(normalize_rows(y, eps))


def spectral_bound(x: jax.Array, y: jax.Array, *, eps: float = NORM_EPS) -> tuple[jax.Array, jax.Array]:
    """Prop. 2(i), Hoffman-Wielandt: (||lambda(G_X) - lambda(G_Y)||_2, ||G_X - G_Y||_F); first <= second.

    The right side equals N sqrt(L_SGA), computed through the N x N Gram matrices (exact even when
    the two are close, where the channel identity loses relative precision).
    """
    x, y = _check_pair(x, y)
    lam_x, lam_y = gram_spectra(x, y, eps=eps)
    return jnp.linalg.norm(lam_x - lam_y), x.shape[0] * gram_distance(x, y, eps=eps)


def subspace_bound(x: jax.Array, y: jax.Array, k: int, *, eps: float = NORM_EPS) -> tuple[jax.Array, jax.Array]:
    """Prop. 2(ii), Davis-Kahan: (||sin Theta||_F, 2 min(sqrt(k) ||E||_2, ||E||_F) / (lambda_k - lambda_{k+1})).

    Theta are the principal angles between the top-k eigenspaces of G_X and G_Y, E = G_X - G_Y and
    the eigengap is G_Y's (Yu, Wang and Samworth 2015). The bound is +inf when the gap is zero.
    Forms the N x N difference: meant for analysis-sized N.
    """
    x, y = _check_pair(x, y)
    sin_theta = jnp.linalg.norm(jnp.sin(principal_angles(x, y, k, eps=eps)))
    diff = gram_difference(x, y, eps=eps)
    op_norm = jnp.max(jnp.abs(jnp.linalg.eigvalsh(diff)))
    _, lam_y = gram_spectra(x, y, eps=eps)
    lam_next = lam_y[k] if k < lam_y.shape[0] else jnp.zeros((), lam_y.dtype)
    gap = lam_y[k - 1] - lam_next
    numerator = 2.0 * jnp.minimum(jnp.sqrt(float(k)) * op_norm, jnp.linalg.norm(diff))
    bound = jnp.where(gap > 0, numerator / jnp.where(gap > 0, gap, 1.0), jnp.inf)
    return sin_theta, bound


def repa_distance_loss(x: jax.Array, y: jax.Array, *, eps: float = NORM_EPS) -> jax.Array:
    """Squared-distance REPA on unit rows, (1/N) ||X - Y||_F^2 = 2 (1 - mean cosine), in [0, 4]."""
    x, y = _check_pair(x, y)
    if x.shape != y.shape:
        raise ValueError(f"patch-wise REPA needs equal shapes: x {tuple(x.shape)} vs y {tuple(y.shape)}")
    d = normalize_rows(x, eps) - normalize_rows(y, eps)
    return jnp.sum(d * d) / x.shape[0]


def containment(x: jax.Array, y: jax.Array, *, eps: float = NORM_EPS) -> tuple[jax.Array, jax.Array]:
    """Prop. 3: (L_SGA(X, Y), 4 L_REPA(X, Y)); the first never exceeds the second."""
    four_repa = 4.0 * repa_distance_loss(x, y, eps=eps)
    return sga_loss(jnp.asarray(x)[None], jnp.asarray(y)[None], method="gram", eps=eps), four_repa


def zero_set_distances(x: jax.Array, y: jax.Array, *, eps: float = NORM_EPS) -> tuple[jax.Array, jax.Array]:
    """Distance from normalised X to each loss's zero set: (REPA: ||X - Y||_F, SGA: min_Q ||X - Y Q||_F).

    REPA's zero set is {Y}; SGA's is the orbit {Y Q} (Prop. 3), so the second is never larger.
    """
    x, y = _check_pair(x, y)
    if x.shape != y.shape:
        raise ValueError(f"REPA's zero set needs equal shapes: x {tuple(x.shape)} vs y {tuple(y.shape)}")
    xn, yn = normalize_rows(x, eps), normalize_rows(y, eps)
    return jnp.linalg.norm(xn - yn), orbit_distance(xn, yn)
