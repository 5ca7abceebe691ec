"""Caffe Python layers added by amct_retrain (installed as ``amct_retrain_layers``)."""
