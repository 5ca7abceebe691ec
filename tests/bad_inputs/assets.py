"""The valid files the bad-input cases start from, built once with real Caffe: a float model, its
configs, the quantization-aware model with a short retraining (snapshot, record), the saved
fake-quant and deploy models, a calibration record and a solver."""
import pathlib

import caffe

import amct_retrain
from amct_retrain import solver
from tests import nets

RETRAIN_ITERS = 4


def build(root: pathlib.Path) -> pathlib.Path:
    """Write the assets under ``root`` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    model, weights = nets.float_model(root)
    nets.float_model(root, fc=5, tag="other")          # another model: same layer names, other fc width
    amct_retrain.create_quant_retrain_config(str(root / "retrain_config.json"), str(model), str(weights))
    amct_retrain.create_quant_config(str(root / "calib_config.json"), str(model), str(weights))
    amct_retrain.create_quant_retrain_model(str(model), str(weights), str(root / "retrain_config.json"),
                                            str(root / "retrain.prototxt"), str(root / "retrain.caffemodel"),
                                            str(root / "record.txt"))
    solver.create_solver(root / "solver.prototxt", root / "retrain.prototxt", max_iter=RETRAIN_ITERS, test_iter=1,
                         snapshot_prefix=root / "snap", random_seed=1)
    s = caffe.get_solver(str(root / "solver.prototxt"))
    s.net.copy_from(str(root / "retrain.caffemodel"))
    s.solve()
    amct_retrain.save_quant_retrain_model(str(root / "retrain.prototxt"), str(root / f"snap_iter_{RETRAIN_ITERS}.caffemodel"),
                                          "Both", str(root / "result" / "model"), str(root / "record.txt"))
    # The other model's retrained prototxt (its fc has 5 outputs), written where its record is its own.
    other = root / "other_run"
    other.mkdir()
    amct_retrain.create_quant_retrain_config(str(other / "config.json"), str(root / "other.prototxt"),
                                             str(root / "other.caffemodel"))
    amct_retrain.create_quant_retrain_model(str(root / "other.prototxt"), str(root / "other.caffemodel"),
                                            str(other / "config.json"), str(other / "retrain.prototxt"),
                                            str(other / "retrain.caffemodel"), str(other / "record.txt"))
    return root
