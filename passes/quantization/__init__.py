"""Quantization: the scheme math (`scheme.py`), calibration data and observers (`calibration.py`,
`observers.py`), the nodes and weights the int8 passes rewrite (`sites.py`), and the passes
(`weights.py`: quantize-weights, `static.py`: quantize-static, `dynamic.py`: quantize-dynamic,
`float16.py`: convert-float16 and convert-bfloat16). What the three int8 passes share
(`driver.py`): the accuracy budget (`mixed_precision.py`), the per-layer report
(`quant_report.py`) and the target CPU's int8 features (`cpu_features.py`)."""
