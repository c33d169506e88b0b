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

# The demo's stage-2 runs against the stage-1 VAE: SGA (out/demo) and, for the feature-drift report,
# iREPA at the same row, layer, weight and steps (out/demo_irepa; docs/geometry.md). They share
# compiled executables (frozen models, the probe's frozen inputs) through JAX's persistent cache.
SGA_RUN = $(PY) -m sga_jax.train --config configs/demo.py --workdir out/demo \
	--config.model.vae.weights=out/demo_vae_export --config.sample_every=60
IREPA_RUN = $(PY) -m sga_jax.train --config configs/demo.py:dinov2,irepa,wlf,layer=1,long_edge=8 \
	--workdir out/demo_irepa --config.model.vae.weights=out/demo_vae_export --config.sample_every=0 \
	--config.checkpoint_every=0
DRIFT_REPORT = $(PY) -m sga_jax.geometry compare out/demo out/demo_irepa --out out/drift --note "The demo's \
	networks are tiny and randomly initialised: these curves show the probe's machinery, not the paper's result."

# The synthetic geometry report beside stage 1, its export, then both stage-2 runs at once (XLA
# compiles each on its own core; the side jobs write out/geometry.log and out/demo_irepa.log) and
# the drift report.
demo: $(STAMP)
	rm -rf out/geometry out/demo_vae out/demo_vae_export out/demo out/demo_irepa out/drift
	mkdir -p out
	$(PY) -m sga_jax.geometry --out out/geometry > out/geometry.log 2>&1 & geometry=$$!; \
	$(PY) -m sga_jax.train --config configs/demo_vae.py --workdir out/demo_vae || { kill $$geometry; exit 1; }; \
	wait $$geometry || { tail -n 20 out/geometry.log; exit 1; }
	$(PY) -m sga_jax.train.export --workdir out/demo_vae --out out/demo_vae_export --format diffusers
	$(IREPA_RUN) > out/demo_irepa.log 2>&1 & irepa=$$!; \
	$(SGA_RUN) || { kill $$irepa; exit 1; }; \
	wait $$irepa || { tail -n 20 out/demo_irepa.log; exit 1; }
	$(DRIFT_REPORT)
	@echo "demo outputs: stage 1 out/demo_vae/ (metrics.jsonl with eval_psnr, samples/ original |" \
	      "reconstruction grids), its F16 VAE out/demo_vae_export/ (diffusers layout); stage 2 against" \
	      "it out/demo/{checkpoints,tensorboard,samples,probe}/, out/demo/metrics.jsonl," \
	      "out/demo/loss_curve.png; loss-geometry report: out/geometry/report.md;" \
	      "feature drift, SGA vs iREPA: out/drift/report.md"

# The drift report again, after `make demo` (reruns the iREPA run against out/demo).
demo-drift: $(STAMP)
	rm -rf out/demo_irepa out/drift
	$(IREPA_RUN)
	$(DRIFT_REPORT)

demo demo-drift: export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/out/jax_cache
# The demo's networks are tiny, so compiling dominates: XLA:CPU's backend at optimisation level 1
# compiles them a third faster, and their steps run as fast.
demo demo-drift: export XLA_FLAGS ?= --xla_backend_optimization_level=1

bench: $(STAMP)
	for script in bench/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) out
