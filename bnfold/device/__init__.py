"""Running artifacts on devices: ``deploy`` (TVM RPC), ``emulate`` (an aarch64 root under
qemu-user) and ``bench`` (latency against onnxruntime, engines in separate processes)."""
