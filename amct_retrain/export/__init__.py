"""Exports of saved models to other formats: ``onnx.export_onnx`` writes a deploy model as ONNX
(``mode="standard"``: QDQ for onnxruntime's integer kernels; ``mode="exact"``: bit for bit)."""
from amct_retrain.export.onnx import export_onnx

__all__ = ["export_onnx"]
