"""Validation of quantized models: the calibration/eval datasets and the checks run on them."""
