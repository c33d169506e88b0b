"""Reports on the geometry of the SGA loss; the math itself lives in `sga_jax.align.geometry`.

- `synthetic`: Propositions 1-3 on synthetic features (`python -m sga_jax.geometry --out DIR`)
"""
