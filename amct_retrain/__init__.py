"""amct_retrain: quantization-aware retraining and INT8 export for Caffe models."""
