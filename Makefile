# Two commands do everything on a fresh clone:  make demo   and   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CACHE   := .cache/models
OUT     := out
STAMP   := $(VENV)/.installed
DEMO    := mobilenet_v2

.PHONY: venv models demo test lint clean

# The venv is rebuilt when the package metadata changes. torch is pinned to the CPU build that
# this machine kind keeps on local disk (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,models]'
	touch $@

venv: $(STAMP)

# Real test material (PP-OCR from the rapidocr-onnxruntime wheel, ImageNet MobileNetV2, a
# ResNet-18, real images) into a git-ignored cache.
models: $(STAMP)
	$(BIN)/python -m benchmarks.models --cache $(CACHE)

demo: models
	@mkdir -p $(OUT)
	$(BIN)/bnfold inspect $(CACHE)/$(DEMO).onnx --brief
	$(BIN)/bnfold fold $(CACHE)/$(DEMO).onnx -o $(OUT)/$(DEMO).folded.onnx --report $(OUT)/$(DEMO).fold.json
	$(BIN)/bnfold verify $(CACHE)/$(DEMO).onnx $(OUT)/$(DEMO).folded.onnx --inputs $(CACHE)/inputs/$(DEMO).npz --rtol 1e-5

lint: $(STAMP)
	$(BIN)/ruff check bnfold passes targets tests benchmarks

test: models lint
	BNFOLD_MODELS=$(CACHE) $(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
