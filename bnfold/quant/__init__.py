"""Post-training int8 quantization: ``calib`` (calibration data), ``quantize`` (CLE, bias
correction, QDQ) and ``report`` (held-out accuracy, per-layer SQNR)."""
