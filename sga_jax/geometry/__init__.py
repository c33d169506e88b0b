"""Reports on the geometry of the SGA loss; the math itself lives in `sga_jax.align.geometry`.

- `synthetic`: Propositions 1-3 on synthetic features (`python -m sga_jax.geometry --out DIR`)
- `compare`: the feature-drift probe's curves of training runs side by side
  (`python -m sga_jax.geometry compare RUN_DIR [RUN_DIR ...] --out DIR`)
"""
