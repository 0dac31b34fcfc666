# Two commands do everything on a fresh clone:  make demo   and   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CACHE   := .cache/models
ZOO     := .cache/zoo
OUT     := out
STAMP   := $(VENV)/.installed
DEMO    := mobilenet_v2
# Where bnfold caches what it builds for running artifacts (the aarch64 runner under qemu).
export BNFOLD_CACHE := $(CURDIR)/.cache/bnfold
# Cross toolchains and user-mode emulation for the arm64/armv7 targets (Debian packages), and
# debootstrap, which builds the aarch64 userland the emulated RPC server runs in.
CROSS_DEB := g++-aarch64-linux-gnu qemu-user-static g++-arm-linux-gnueabihf debootstrap
# The aarch64 Debian root (Python 3.11 + the TVM runtime) that `bnfold serve --emulate arm64`
# runs under qemu-user; exported so that the tests use it (and fail if it is unusable).
export BNFOLD_ARM64_ROOT := $(BNFOLD_CACHE)/arm64-root
RPC_PORT ?= 9091

.PHONY: venv models demo test lint clean cross-tools browser arm64-root arm64-rpc-server bench bench-aimet aimet-venv \
	bench-suite zoo zoo-ci bench-zoo test-zoo

# The venv is rebuilt when the package metadata changes. torch is pinned to the CPU build that
# this machine kind keeps on local disk (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,models,tvm,tune,bench]'
	touch $@

venv: $(STAMP)

# Real test material (PP-OCR from the rapidocr-onnxruntime wheel, ImageNet MobileNetV2, a
# ResNet-18, real images) into a git-ignored cache.
models: $(STAMP)
	$(BIN)/python -m benchmarks.models --cache $(CACHE)

# The architecture zoo: torchvision's CNN definitions (its pure-Python code from the
# torchvision==0.28.0 wheel, unpacked into $(ZOO)/torchvision-site, never installed), seeded random
# weights, exported three ways (TorchScript, TorchScript keeping BN, dynamo) into a git-ignored
# cache. Cached: what exists (or is recorded as a failed export) is skipped.
zoo: $(STAMP)
	$(BIN)/python -m benchmarks.zoo --cache $(ZOO)

# The representative third of the zoo that `make test` compiles (benchmarks.zoo.CI).
zoo-ci: $(STAMP)
	$(BIN)/python -m benchmarks.zoo --cache $(ZOO) --ci

# Every zoo model compiled, verified and timed against onnxruntime: benchmarks/results/zoo.json/png.
bench-zoo: zoo
	$(BIN)/python -m benchmarks.bench_zoo --zoo $(ZOO)

# Every zoo model through tests/test_zoo.py (make test runs only the CI third).
test-zoo: zoo
	BNFOLD_ZOO=$(ZOO) $(BIN)/pytest -q -m zoo tests/test_zoo.py

demo: models
	@mkdir -p $(OUT)
	$(BIN)/bnfold inspect $(CACHE)/$(DEMO).onnx --brief
	$(BIN)/bnfold fold $(CACHE)/$(DEMO).onnx -o $(OUT)/$(DEMO).folded.onnx --report $(OUT)/$(DEMO).fold.json
	$(BIN)/bnfold verify $(CACHE)/$(DEMO).onnx $(OUT)/$(DEMO).folded.onnx --inputs $(CACHE)/inputs/$(DEMO).npz --rtol 1e-5
	$(BIN)/bnfold compile $(CACHE)/$(DEMO).onnx --target x86 -o $(OUT)/$(DEMO).x86 --inputs $(CACHE)/inputs/$(DEMO).npz

# Installs the cross compilers and qemu-user only when one is missing (needs root, as on CI).
cross-tools:
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null \
	  && command -v arm-linux-gnueabihf-g++ >/dev/null \
	  && { command -v debootstrap >/dev/null || test -x /usr/sbin/debootstrap; } \
	  || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CROSS_DEB); }

# A real headless browser for the test that loads the HTML report (Debian's
# chromium-headless-shell, ~1 min once; needs root, as on CI).
browser:
	@command -v chromium-headless-shell >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium-headless-shell; }

# The aarch64 root for the emulated RPC server (debootstrap arm64 minbase + python3, and the
# aarch64 TVM runtime wheels): ~30 s and ~220 MB once, then a no-op while the stamp in it matches
# the installed TVM. Needs root, a Debian mirror and the package index; fails if it cannot build.
arm64-root: $(STAMP) cross-tools
	$(BIN)/python -m bnfold.device.emulate build --root $(BNFOLD_ARM64_ROOT)

# An aarch64 TVM RPC server under qemu-user on 127.0.0.1:$(RPC_PORT), for
# `bnfold deploy OUTDIR --rpc 127.0.0.1:$(RPC_PORT)` of an arm64 build (Ctrl-C stops it).
arm64-rpc-server: arm64-root
	$(BIN)/bnfold serve --emulate arm64 --port $(RPC_PORT)

# x86 latency of the compiled models vs onnxruntime (ORT_ENABLE_ALL), 1 and 2 threads.
bench: models
	$(BIN)/python -m benchmarks.bench_cpu --cache $(CACHE)

# Latency of 4 runtimes + fold time vs TVM's FoldBatchnormToConv2D on the real models, with plots.
bench-suite: models
	$(BIN)/python -m benchmarks.run --cache $(CACHE)

# AIMET (aimet-onnx) for benchmarks/int8_aimet.py, in its own venv: it needs torch, which the
# project does not. The CPU torch 2.13.0 from local disk first, then aimet-onnx without its
# onnx2torch (used only by AdaScale/LoRA; it pulls torchvision, and that a CUDA torch of GBs).
AIMET_VENV := .aimet-venv
AIMET_DEPS := Jinja2 PyYAML bokeh hvplot jsonschema onnx onnx_ir onnxscript osqp pandas psutil \
	pybind11 scikit-learn scipy tqdm
aimet-venv: $(AIMET_VENV)/.installed
$(AIMET_VENV)/.installed: $(STAMP)
	$(PY) -m venv $(AIMET_VENV)
	$(AIMET_VENV)/bin/pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(AIMET_VENV)/constraints.txt
	$(AIMET_VENV)/bin/pip install -q -c $(AIMET_VENV)/constraints.txt $(AIMET_DEPS) \
		onnxruntime==$$($(BIN)/python -c "import onnxruntime; print(onnxruntime.__version__)")
	$(AIMET_VENV)/bin/pip install -q --no-deps aimet-onnx
	$(AIMET_VENV)/bin/python -c "import aimet_onnx.quantsim, aimet_onnx.cross_layer_equalization"
	touch $@

bench-aimet: models aimet-venv
	$(BIN)/python -m benchmarks.int8_aimet --cache $(CACHE) --aimet-python $(AIMET_VENV)/bin/python

lint: $(STAMP)
	$(BIN)/ruff check bnfold passes targets tests benchmarks

test: models zoo-ci lint cross-tools browser arm64-root
	BNFOLD_MODELS=$(CACHE) BNFOLD_ZOO=$(ZOO) $(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
