"""Quantization: the scheme math (`scheme.py`), calibration data and observers (`calibration.py`,
`observers.py`), and the passes that rewrite models (`weights.py`: quantize-weights)."""
