PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-drift bench install plan-deps clean

$(STAMP): requirements.txt requirements-dev.txt requirements-dev-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-dev-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The planner's TPU and GPU compilers (libtpu, the CUDA PJRT plugin, cuDNN), ~1.8 GB to download and
# ~3.1 GB installed: `python -m sga_jax.plan --target v5p-16|h100x8` needs them, training does not.
plan-deps: $(STAMP)
	$(PY) -m pip install -q -r requirements-plan.txt

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) -m sga_jax.geometry --out out/geometry
	rm -rf out/demo_vae out/demo_vae_export out/demo
	$(PY) -m sga_jax.train --config configs/demo_vae.py --workdir out/demo_vae
	$(PY) -m sga_jax.train.export --workdir out/demo_vae --out out/demo_vae_export --format diffusers
	$(PY) -m sga_jax.train --config configs/demo.py --workdir out/demo \
	    --config.model.vae.weights=out/demo_vae_export
	$(MAKE) --no-print-directory demo-drift
	@echo "demo outputs: stage 1 out/demo_vae/ (metrics.jsonl with eval_psnr, samples/ original |" \
	      "reconstruction grids), its F16 VAE out/demo_vae_export/ (diffusers layout); stage 2 against" \
	      "it out/demo/{checkpoints,tensorboard,samples,probe}/, out/demo/metrics.jsonl," \
	      "out/demo/loss_curve.png; loss-geometry report: out/geometry/report.md;" \
	      "feature drift, SGA vs iREPA: out/drift/report.md"

# The feature-drift report of the demo's SGA run (out/demo) against an iREPA run of the same row,
# layer, weight, steps and stage-1 VAE (docs/geometry.md). The runs share compiled executables
# (frozen models, the probe's frozen inputs) through JAX's persistent compilation cache.
demo demo-drift: export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/out/jax_cache
demo-drift: $(STAMP)
	rm -rf out/demo_irepa out/drift
	$(PY) -m sga_jax.train --config configs/demo.py:dinov2,irepa,wlf,layer=1,long_edge=8 --workdir out/demo_irepa \
	    --config.model.vae.weights=out/demo_vae_export --config.sample_every=0 --config.checkpoint_every=0
	$(PY) -m sga_jax.geometry compare out/demo out/demo_irepa --out out/drift \
	    --note "The demo's networks are tiny and randomly initialised: these curves show the probe's machinery, not the paper's result."

bench: $(STAMP)
	for script in bench/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) out
