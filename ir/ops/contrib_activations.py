"""Kernels, inference and costs for ONNX Runtime contrib ops (`com.microsoft`) that fusion passes
emit for `--target onnxruntime`; see the module body."""
