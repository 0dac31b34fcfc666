"""Fuzzing bnfold's input handling: a corpus of mutated ONNX files and an in-process harness.

* :mod:`tests.fuzz.corpus` builds seed models (synthetic, plus the real ones when fetched) and
  mutates them (bytes, graph structure, tensors, attributes, opsets, external data);
* :mod:`tests.fuzz.harness` runs one case through ``bnfold.cli.main`` in this process and
  checks the contract (exit 0 with a valid, equivalent output, or exit 2 with one line and no
  output; never anything else, never a hang);
* :mod:`tests.fuzz.fuzz_load` is the long-run target (``python -m tests.fuzz.fuzz_load``).
"""
