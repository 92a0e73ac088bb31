"""Conversions between forms of the same model: opset versions, precisions."""
