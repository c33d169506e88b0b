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
	rm -rf out/demo
	$(PY) -m sga_jax.train --config configs/demo.py --workdir out/demo
	@echo "demo outputs: out/demo/{checkpoints,tensorboard,samples}/, out/demo/metrics.jsonl," \
	      "out/demo/loss_curve.png; loss-geometry report: out/geometry/report.md"

bench: $(STAMP)
	for script in bench/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) out
