"""Exports of saved models to other formats: ``onnx.export_onnx`` writes a deploy model as QDQ ONNX."""
from amct_retrain.export.onnx import export_onnx

__all__ = ["export_onnx"]
