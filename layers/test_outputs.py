"""TestOutputLog: the TEST outputs of a plain ``caffe train`` run, as Caffe prints them, to TensorBoard."""
import caffe
import numpy as np

from amct_retrain import tensorboard
from amct_retrain.errors import LayerParamError
from amct_retrain.layer_specs import TEST_OUTPUT_LOG


class TestOutputLog(caffe.Layer):
    """In place on every output blob of the TEST net (each top keeps the loss weight its producer
    gave it, so Caffe prints and weighs the outputs as before); passes them through unchanged.

    Under ``caffe train -solver FILE`` (read from the process's command line, see
    :func:`amct_retrain.tensorboard.caffe_train_tests`), it sums each single-value output over the
    ``test_iter`` batches of a TEST pass and logs the means, the numbers Caffe prints as
    "Test net output", as ``test/<blob>`` at the iteration of the pass. Anywhere else (pycaffe,
    where ``amct_retrain.train`` logs the TEST means itself) it only passes the blobs through.
    """

    __test__ = False  # not a pytest class, whatever its name

    def setup(self, bottom, top):
        p = TEST_OUTPUT_LOG.parse(self.param_str)
        self.layer_name, self.log_dir = p["name"], p["log_dir"]
        self.outputs = p["outputs"]
        if not len(bottom) == len(top) == len(self.outputs):
            raise LayerParamError(f"TestOutputLog layer '{self.layer_name}': needs one top per bottom (in place) "
                                  "and one name per bottom in 'outputs'")
        self.tests = tensorboard.caffe_train_tests()
        self.sums: list[np.ndarray] | None = None
        self.batches = 0

    def reshape(self, bottom, top):
        pass  # in place: the tops are the bottoms

    def forward(self, bottom, top):
        if self.tests is None:
            return
        values = [bottom[i].data.astype(np.float32) for i in range(len(bottom))]
        # float32 sums, then one division, as Caffe's Solver::Test computes its means.
        self.sums = values if self.sums is None else [s + v for s, v in zip(self.sums, values)]
        self.batches += 1
        if self.batches == self.tests.test_iter:
            iteration = next(self.tests.iterations, None)
            means = [s / np.float32(self.batches) for s in self.sums]
            scalars = {f"test/{name}": float(m.ravel()[0]) for name, m in zip(self.outputs, means) if m.size == 1}
            if iteration is not None:
                tensorboard.log_scalars(self.log_dir, scalars, iteration)
            self.sums, self.batches = None, 0

    def backward(self, top, propagate_down, bottom):
        pass  # the TEST net never runs backward
