PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench install clean

$(STAMP): requirements.txt requirements-dev.txt requirements-dev-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-dev-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) -m sga_jax.geometry --out out/geometry
	rm -rf out/demo_vae out/demo_vae_export out/demo
	$(PY) -m sga_jax.train --config configs/demo_vae.py --workdir out/demo_vae
	$(PY) -m sga_jax.train.export --workdir out/demo_vae --out out/demo_vae_export --format diffusers
	$(PY) -m sga_jax.train --config configs/demo.py --workdir out/demo \
	    --config.model.vae.weights=out/demo_vae_export
	@echo "demo outputs: stage 1 out/demo_vae/ (metrics.jsonl with eval_psnr, samples/ original |" \
	      "reconstruction grids), its F16 VAE out/demo_vae_export/ (diffusers layout); stage 2 against" \
	      "it out/demo/{checkpoints,tensorboard,samples}/, out/demo/metrics.jsonl, out/demo/loss_curve.png;" \
	      "loss-geometry report: out/geometry/report.md"

bench: $(STAMP)
	for script in bench/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) out
