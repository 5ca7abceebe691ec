"""Per-layer analysis of a quantized model: the float and the fake-quant model on the same
batches, measured (metrics), reported (analysis.json, report.html with plots, a console table)."""
from amct_retrain.analysis.runner import analyze

__all__ = ["analyze"]
