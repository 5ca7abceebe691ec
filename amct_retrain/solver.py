"""Retraining solvers: templates, the contract's solver rules (section 5), and a training
loop with a progress bar and TensorBoard scalars.

Caffe aborts the whole process on a solver it cannot use (a missing net, a snapshot folder
it cannot write, an unknown lr_policy, a step policy with stepsize 0), so everything that
Caffe would CHECK is checked here first and raised as :class:`SolverError`, whose message
names the file, the field, its value and the rule.
"""
import logging
import math
import os
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import caffe
import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from google.protobuf.text_encoding import CEscape
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain import fileio, numerics, record, tensorboard
from amct_retrain.config import ConfigError, read_config_json
from amct_retrain.errors import ArgumentError, InputMissingError, SolverError  # noqa: F401 (re-exported)
from amct_retrain.graph.model_io import ModelError, probe_net, read_caffemodel, read_prototxt
from amct_retrain.layer_specs import ACTIVATION_ULQ, SHIFT_N_SEARCH, WEIGHT_ARQ, LayerSpec

LOG = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
TEMPLATE_DIRS = (_HERE / "solver_templates",         # installed as package data
                 _HERE.parent / "solver_templates")  # a source checkout (editable install)
DEFAULT_TEMPLATE = "retrain_sgd"
FINAL_TEST_NOTE = ("these TEST outputs are the quantization-aware net's: its ShiftNSearch layers measure shift-N "
                   "without requantizing, so the saved fake-quant model (which requantizes) may score slightly "
                   "otherwise; measure that model after saving it")
DEFAULT_LOG_EVERY = 10
"""Iterations between two logs of the training scalars when the solver's ``display`` is 0."""

# Fields that give Caffe a net other than the one ``net:``; contract section 5 wants only ``net:``.
_OTHER_NET_FIELDS = ("net_param", "train_net", "train_net_param", "test_net", "test_net_param")
# Caffe's lr policies (SGDSolver::GetLearningRate): the factor applied to base_lr at iteration i.
_LR_POLICIES: dict[str, Callable[[caffe_pb2.SolverParameter, int], float]] = {
    "fixed": lambda p, i: 1.0,
    "step": lambda p, i: p.gamma ** (i // p.stepsize),
    "exp": lambda p, i: p.gamma ** i,
    "inv": lambda p, i: (1.0 + p.gamma * i) ** -p.power,
    # Caffe advances its step counter once per iteration past each stepvalue: for increasing
    # stepvalues that is the number of stepvalues reached.
    "multistep": lambda p, i: p.gamma ** sum(i >= v for v in p.stepvalue),
    "poly": lambda p, i: (1.0 - i / p.max_iter) ** p.power,
    "sigmoid": lambda p, i: 1.0 / (1.0 + math.exp(-p.gamma * (i - p.stepsize))),
}


# --------------------------------------------------------------------------- reading and rules


def _read_solver(solver_file: str | os.PathLike) -> caffe_pb2.SolverParameter:
    path = os.fspath(solver_file)
    return _parse_solver(fileio.read_text_file(path, "solver file", SolverError), path)


def _parse_solver(text: str, source: str) -> caffe_pb2.SolverParameter:
    try:
        return text_format.Parse(text, caffe_pb2.SolverParameter())
    except text_format.ParseError as err:
        raise SolverError(f"{source}:{err.GetLine()}:{err.GetColumn()}: {err}") from None


def _shown(param: caffe_pb2.SolverParameter, name: str) -> str:
    """A field's value as prototxt would write it; an unset field shows Caffe's default."""
    field = param.DESCRIPTOR.fields_by_name[name]
    value = getattr(param, name)
    if field.is_repeated:
        return "[" + ", ".join("{...}" if field.message_type else _scalar_text(v) for v in value) + "]"
    text = "{...}" if field.message_type else _scalar_text(value)
    return text if param.HasField(name) else f"{text} (not set; Caffe's default)"


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _is_set(param: caffe_pb2.SolverParameter, name: str) -> bool:
    if param.DESCRIPTOR.fields_by_name[name].is_repeated:
        return len(getattr(param, name)) > 0
    return param.HasField(name)


def _issue(param: caffe_pb2.SolverParameter, name: str, rule: str) -> str:
    return f"field '{name}' = {_shown(param, name)}: {rule}"


def _raise_if(issues: list[str], solver_file: str | os.PathLike) -> None:
    if issues:
        raise SolverError("\n".join(f"{os.fspath(solver_file)}: {issue}" for issue in issues))


def _contract_issues(param: caffe_pb2.SolverParameter, batch_num: int, batch_source: str) -> list[str]:
    """Contract section 5, plus the end-of-training TEST that the record file depends on."""
    issues = [_issue(param, name, "retraining needs exactly one 'net:' and no other net field")
              for name in _OTHER_NET_FIELDS if _is_set(param, name)]
    if not param.HasField("net"):
        issues.append(_issue(param, "net", "retraining needs exactly one 'net:' (the quant-aware model)"))
    if not param.test_iter:
        issues.append(_issue(param, "test_iter", f"a TEST phase is required, with test_iter >= batch_num "
                                                 f"({batch_num}, {batch_source})"))
    elif min(param.test_iter) < batch_num:
        issues.append(_issue(param, "test_iter", f"must be >= batch_num ({batch_num}, {batch_source}): "
                                                 "the shift-N search reads batch_num TEST batches"))
    if param.test_interval <= 0:
        issues.append(_issue(param, "test_interval", "must be > 0: the TEST phase searches shift-N "
                                                     "and writes the record file"))
    elif param.max_iter % param.test_interval:
        issues.append(_issue(param, "test_interval", f"must divide max_iter ({param.max_iter}), so that "
                                                     "Caffe's last TEST, which writes the record file, "
                                                     "sees the final weights"))
    if param.test_initialization:
        issues.append(_issue(param, "test_initialization", "must be false: an initial TEST would search "
                                                           "shift-N on untrained factors"))
    return issues


def _training_issues(param: caffe_pb2.SolverParameter) -> list[str]:
    """What train() needs beyond the contract: a run that ends in a snapshot, a known lr policy."""
    issues = []
    if not param.snapshot_prefix:
        issues.append(_issue(param, "snapshot_prefix", "is required: the retrained weights are the "
                                                       "final snapshot"))
    if not param.snapshot_after_train and (param.snapshot <= 0 or param.max_iter % param.snapshot):
        issues.append(_issue(param, "snapshot_after_train", f"no snapshot would be written at max_iter "
                                                            f"({param.max_iter}): set it true, or snapshot "
                                                            "to a divisor of max_iter"))
    if param.max_iter <= 0:
        issues.append(_issue(param, "max_iter", "must be > 0"))
    else:  # poly divides by max_iter
        try:
            learning_rate(param, 0)
        except SolverError as err:
            issues.append(str(err))
    return issues


def _file_issues(param: caffe_pb2.SolverParameter) -> list[str]:
    """Paths Caffe reads or writes; relative ones are taken from the current folder, as Caffe does."""
    issues = []
    if param.net and not os.path.isfile(param.net):
        issues.append(_issue(param, "net", f"no such file (from {os.getcwd()})"))
    if param.snapshot_prefix and not os.path.isdir(os.path.dirname(os.path.abspath(param.snapshot_prefix))):
        issues.append(_issue(param, "snapshot_prefix", "its folder does not exist"))
    return issues


def _config_batch_num(config_file: str | os.PathLike) -> int:
    """The top-level ``batch_num`` of a retrain config (JSON), 1 when absent."""
    config = read_config_json(os.fspath(config_file), "retrain config")
    batch_num = config.get("batch_num", 1) if isinstance(config, dict) else None
    if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num < 1:
        raise ConfigError(f"{config_file}: key 'batch_num' must be an integer >= 1, got {batch_num!r}")
    return batch_num


def check_solver(solver_file: str | os.PathLike, config_file: str | os.PathLike) -> None:
    """Check a retraining solver against contract section 5.

    Rules: exactly one ``net:`` (no ``train_net``, ``test_net``, ``net_param``); a TEST phase
    (``test_iter`` given, ``test_interval > 0``) whose ``test_iter`` is at least the config's
    ``batch_num`` and whose interval divides ``max_iter`` (Caffe's last TEST, which writes the
    record file, must see the final weights); ``test_initialization: false`` (Caffe's default is
    true, so leaving it out breaks the rule).

    Args:
        solver_file: the solver prototxt.
        config_file: the retrain config (JSON); only its top-level ``batch_num`` (default 1) is read.

    Raises:
        SolverError: one line per broken rule, each naming the file, the field, its value and
            the rule; or ``FILE:LINE:COL`` for a file that does not parse.
        ConfigError (a ValueError): the config is not JSON or its ``batch_num`` is not an integer >= 1.
    """
    param = _read_solver(solver_file)
    batch_num = _config_batch_num(config_file)
    _raise_if(_contract_issues(param, batch_num, f"from {os.fspath(config_file)}"), solver_file)


# --------------------------------------------------------------------------- learning rate


def learning_rate(param: caffe_pb2.SolverParameter, iteration: int) -> float:
    """The learning rate Caffe's SGD-family solvers use for the update of ``iteration``.

    Caffe's ``lr_policy`` formulas (fixed, step, exp, inv, multistep, poly, sigmoid), computed
    in float64 (Caffe uses float32, so the last digits may differ).

    Raises:
        SolverError: an unknown policy, or a step policy with ``stepsize`` <= 0 (Caffe would abort).
    """
    if param.lr_policy not in _LR_POLICIES:
        raise SolverError(_issue(param, "lr_policy", f"unknown policy (Caffe knows {', '.join(_LR_POLICIES)})"))
    if param.lr_policy == "step" and param.stepsize <= 0:
        raise SolverError(_issue(param, "stepsize", "must be > 0 with lr_policy \"step\""))
    return param.base_lr * _LR_POLICIES[param.lr_policy](param, iteration)


# --------------------------------------------------------------------------- templates


def _template_file(template: str) -> Path:
    """A template name (a file ``<name>.prototxt`` of TEMPLATE_DIRS) or a template's path."""
    if template.endswith(".prototxt"):
        return Path(template)
    for folder in TEMPLATE_DIRS:
        candidate = folder / f"{template}.prototxt"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in TEMPLATE_DIRS if folder.is_dir() for p in folder.glob("*.prototxt")})
    raise ArgumentError(f"no solver template '{template}' in {', '.join(map(str, TEMPLATE_DIRS))} "
                     f"(known: {', '.join(known) or 'none'})")


def _apply_overrides(param: caffe_pb2.SolverParameter, overrides: dict[str, Any], source: str) -> None:
    """Set solver fields by name: scalars, enum names (``solver_mode="CPU"``), lists for repeated fields."""
    fields = param.DESCRIPTOR.fields_by_name
    for name, value in overrides.items():
        if name not in fields:
            raise SolverError(f"{source}: unknown solver field '{name}' = {value!r} in the overrides")
        try:
            if fields[name].is_repeated:
                param.ClearField(name)
                getattr(param, name).extend(value)
            else:
                setattr(param, name, value)
        except (TypeError, ValueError, AttributeError) as err:
            raise SolverError(f"{source}: field '{name}' = {value!r} from the overrides: {err}") from None


def create_solver(solver_file: str | os.PathLike, model_file: str | os.PathLike, max_iter: int,
                  test_iter: int, base_lr: float = 0.001, snapshot_prefix: str | os.PathLike | None = None,
                  template: str = DEFAULT_TEMPLATE, **overrides: Any) -> None:
    """Write a retraining solver from a template, checked before it is written.

    The template (``retrain_sgd``: SGD, fixed lr, momentum 0.9, weight decay 5e-4;
    ``retrain_adam``; or a path to a ``.prototxt`` with the same placeholders) runs TEST only
    at the end (``test_interval = max_iter``, ``test_initialization: false``) and snapshots
    at ``max_iter``, CPU. Paths are written absolute, so the solver works from any folder;
    ``display`` is max_iter / 100 (about 100 log points per run).

    Args:
        solver_file: the solver to write (its folder is created; replaced atomically).
        model_file: the quant-aware net (the ``net:``).
        max_iter: iterations to train.
        test_iter: TEST batches at the end; at least the config's ``batch_num``.
        base_lr: the learning rate.
        snapshot_prefix: where snapshots go (``<prefix>_iter_<max_iter>.caffemodel``); default
            ``retrained`` beside the solver. Its folder is created.
        template: a template name or path.
        **overrides: any SolverParameter field, e.g. ``lr_policy="step", stepsize=1000,
            gamma=0.1, random_seed=1, stepvalue=[100, 200], solver_mode="CPU"``.

    Raises:
        SolverError: the result breaks a rule of :func:`check_solver` (with batch_num 1) or what
            :func:`train` needs (a final snapshot, a known lr policy), or an override is invalid.
    """
    solver_file = os.path.abspath(solver_file)
    fileio.check_outputs_are_not_inputs({"model file": model_file}, {"solver file": solver_file})
    prefix = os.path.abspath(snapshot_prefix or os.path.join(os.path.dirname(solver_file), "retrained"))
    template_file = _template_file(template)
    text = string.Template(template_file.read_text(encoding="utf-8")).substitute(
        net=CEscape(os.path.abspath(model_file), as_utf8=True), max_iter=max_iter, test_iter=test_iter,
        base_lr=repr(float(base_lr)), display=max(1, max_iter // 100),
        snapshot_prefix=CEscape(prefix, as_utf8=True))
    param = _parse_solver(text, str(template_file))
    _apply_overrides(param, overrides, solver_file)
    _raise_if(_contract_issues(param, 1, "at least 1") + _training_issues(param), solver_file)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)  # Caffe aborts when it cannot write snapshots
    fileio.atomic_write(solver_file, f"# Written by amct_retrain.solver.create_solver from {template_file}\n"
                                     + text_format.MessageToString(param))
    LOG.info("solver %s written (template %s, net %s)", solver_file, template_file.name, param.net)


# --------------------------------------------------------------------------- training


def _toolkit_layers(net: caffe.Net, spec: LayerSpec) -> Iterator[tuple[str, Any, dict]]:
    """(name, Python layer object, parsed param_str, defaults filled) of every ``spec`` layer of ``net``."""
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "Python" and (type(layer).__module__, type(layer).__name__) == (spec.python_module,
                                                                                         spec.layer_class):
            yield name, layer, spec.parse(layer.param_str)


def _output_scalars(net: caffe.Net, prefix: str) -> dict[str, float]:
    """The net's single-value outputs (losses, accuracies) as ``<prefix>/<blob>``."""
    return {f"{prefix}/{name}": float(net.blobs[name].data.flat[0])
            for name in net.outputs if net.blobs[name].data.size == 1}


class _RunLog:
    """What train() logs to TensorBoard, read from the solver's nets between iterations.

    Layers whose param_str has its own ``log_dir`` log themselves (every N forward calls) and
    are left out here, so a series is never written twice.
    """

    def __init__(self, solver: caffe._caffe.Solver, param: caffe_pb2.SolverParameter, log_dir: str) -> None:
        self.solver, self.param, self.writer = solver, param, tensorboard.get_writer(log_dir)
        self.ulq = [(name, layer, solver.net.bottom_names[name][0])
                    for name, layer, p in _toolkit_layers(solver.net, ACTIVATION_ULQ) if not p.get("log_dir")]
        self.arq = [(name, p.get("channel_axis"), p["num_bits_w"])
                    for name, _, p in _toolkit_layers(solver.net, WEIGHT_ARQ) if not p.get("log_dir")]
        # Shift-N is searched by the test nets' layers; one entry per layer name.
        self.shift_n = {name: p for net in solver.test_nets
                        for name, _, p in _toolkit_layers(net, SHIFT_N_SEARCH) if not p.get("log_dir")}

    def train_step(self, iteration: int, outputs: dict[str, float]) -> None:
        """Loss, lr and the quant layers' clips and weight scales after ``iteration``."""
        net = self.solver.net
        scalars = {**outputs, "train/lr": learning_rate(self.param, iteration)}
        histograms = {}
        for name, layer, bottom in self.ulq:
            # layer.clips: the sanitised pair this batch was quantized with (the solver has
            # updated the clip blobs since).
            scalars.update(tensorboard.ulq_scalars(name, net.blobs[bottom].data, layer.clips, layer.num_bits))
            histograms.update(tensorboard.ulq_histograms(name, net.blobs[bottom].data))
        for name, axis, num_bits in self.arq:
            master = net.params[name][WEIGHT_ARQ.blob("master_weights")].data
            scalars.update(tensorboard.arq_scalars(name, numerics.arq_scale(master, axis, num_bits)))
            histograms.update(tensorboard.arq_histograms(name, master))
        self.writer.add_scalars(scalars, iteration)
        if histograms:
            self.writer.add_histograms(histograms, iteration)

    def test_step(self, iteration: int, outputs: dict[str, float]) -> None:
        """The TEST outputs at ``iteration`` (``test/<blob>``: the means over test_iter batches)
        and the shift-N the TEST wrote to the record."""
        scalars = dict(outputs)
        records = {f: record.read_record(f) for f in {p["record_file"] for p in self.shift_n.values()}
                   if os.path.isfile(f)}
        for name, p in self.shift_n.items():
            entry = records.get(p["record_file"], {}).get(p["quantized_layer"])
            if entry is not None and entry.shift_bit:
                scalars.update(tensorboard.shift_n_scalars(name, entry.shift_bit))
        self.writer.add_scalars(scalars, iteration)


def _test_net_outputs(net: caffe.Net, test_iter: int) -> dict[str, np.ndarray]:
    """Each output blob of ``net`` summed over ``test_iter`` forward passes and divided by
    test_iter, element by element, in float32 as Caffe's ``Solver::Test`` does (so the values are
    the ones ``caffe train`` prints as "Test net output")."""
    sums: dict[str, np.ndarray] = {}
    for _ in range(test_iter):
        for name, value in net.forward().items():  # views, overwritten by the next forward
            sums[name] = value.astype(np.float32) if name not in sums else sums[name] + value
    return {name: total / np.float32(test_iter) for name, total in sums.items()}


def run_test(solver: caffe._caffe.Solver, param: caffe_pb2.SolverParameter) -> dict[str, float]:
    """Caffe's TEST of every test net, as ``Solver::TestAll`` runs it: the test net shares the
    train net's weights, runs ``test_iter`` batches (the ShiftNSearch layers search shift-N and
    write the record), and each output is the mean over those batches.

    Returns:
        ``{"test/<blob>": mean}`` (``test1/<blob>`` for a second test net) of the single-value
        outputs; every output is logged at INFO as Caffe prints it.
    """
    scalars = {}
    for i, (net, test_iter) in enumerate(zip(solver.test_nets, param.test_iter)):
        net.share_with(solver.net)
        for name, mean in _test_net_outputs(net, test_iter).items():
            LOG.info("TEST net #%d at iteration %d, mean of %d batches: %s = %s", i, solver.iter, test_iter, name,
                     " ".join(f"{v:.6g}" for v in mean.ravel()))
            if mean.size == 1:
                scalars[f"test{i or ''}/{name}"] = float(mean.ravel()[0])
    return scalars


def _solver_without_caffe_tests(param: caffe_pb2.SolverParameter) -> caffe._caffe.Solver:
    """A pycaffe solver of ``param`` whose own TESTs never run (a test_interval past max_iter):
    train() runs them (:func:`run_test`), because pycaffe does not hand out Caffe's means."""
    quiet = caffe_pb2.SolverParameter()
    quiet.CopyFrom(param)
    quiet.test_interval = param.max_iter + 1
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text_format.MessageToString(quiet))
    try:
        return caffe.get_solver(f.name)
    finally:
        os.unlink(f.name)


def caffe_log_file(solver_file: str | os.PathLike) -> str:
    """``caffe_train.log`` in the folder of the solver's ``snapshot_prefix`` (beside the snapshots)."""
    param = _read_solver(solver_file)
    return os.path.join(os.path.dirname(os.path.abspath(param.snapshot_prefix)), "caffe_train.log")


def _snapshot_file(param: caffe_pb2.SolverParameter, iteration: int) -> str:
    extension = ".caffemodel.h5" if param.snapshot_format == caffe_pb2.SolverParameter.HDF5 else ".caffemodel"
    return os.path.abspath(f"{param.snapshot_prefix}_iter_{iteration}{extension}")


def _check_solverstate(snapshot: str) -> None:
    """The .solverstate and the caffemodel it names exist (Caffe aborts on either missing)."""
    if not os.path.isfile(snapshot):
        raise InputMissingError(f"solver state {snapshot} not found")
    if snapshot.endswith(".h5"):
        return
    state = caffe_pb2.SolverState()
    try:
        with open(snapshot, "rb") as f:
            state.ParseFromString(f.read())
    except DecodeError:
        raise SolverError(f"{snapshot}: not a Caffe solver state") from None
    if state.learned_net and not os.path.isfile(state.learned_net):
        raise InputMissingError(f"{snapshot}: its weights file {state.learned_net} not found")


def _check_weights_fit(net: caffe.Net, weights_file: str) -> None:
    """Layers of the weights that the net also has carry blobs of the net's shapes (Caffe
    copies by layer name and aborts on a mismatch; layers only in one of them are fine)."""
    for layer, arrays in read_caffemodel(weights_file).items():
        if layer not in net.params:
            continue
        expected = [tuple(b.data.shape) for b in net.params[layer]]
        got = [tuple(a.shape) for a in arrays]
        if got != expected:
            raise ModelError(f"{weights_file}: layer '{layer}' has blobs of shapes {got}, the solver's "
                             f"net expects {expected}")


def _check_test_iter(param: caffe_pb2.SolverParameter, solver: caffe._caffe.Solver) -> list[str]:
    """Each test net's test_iter covers the batch_num of its ShiftNSearch layers."""
    issues = []
    for test_iter, net in zip(param.test_iter, solver.test_nets):
        for name, _, p in _toolkit_layers(net, SHIFT_N_SEARCH):
            if p.get("batch_num", 1) > test_iter:
                issues.append(_issue(param, "test_iter", f"must be >= batch_num ({p['batch_num']}) of "
                                                         f"ShiftNSearch layer '{name}'"))
    return issues


def train(solver_file: str | os.PathLike, weights_file: str | os.PathLike | None = None,
          log_dir: str | os.PathLike | None = None, snapshot: str | os.PathLike | None = None) -> str:
    """Retrain with pycaffe as ``caffe train`` would, with a progress bar and TensorBoard scalars.

    Fine-tunes from ``weights_file`` (copied into the train net; the test nets share its
    blobs at each TEST) or resumes from a ``.solverstate`` (``snapshot``), then steps one
    iteration at a time to ``max_iter`` and lets Caffe end the run as ``Solver::Solve`` does
    (a snapshot if none was taken at max_iter, then the last TEST, which writes the record).

    With ``log_dir``, scalars go to TensorBoard there, at Caffe's iteration numbers:

    * every ``display`` iterations (10 when display is 0): ``train/<output>`` (the loss of that
      iteration), ``train/lr``, and per quant layer ``<ulq>/clip_min``, ``clip_max``,
      ``scale_d``, ``fraction_clipped`` and ``<arq>/scale_w_min``, ``_mean``, ``_max``, and the
      histograms ``<ulq>/input_activations`` and ``<arq>/master_weights``;
    * after each TEST: ``test/<output>`` (``test1/...`` for a second test net), the mean over
      the test_iter batches (the number ``caffe train`` prints), and
      ``<shift_n>/shift_bit_mean`` from the record file.

    The TESTs run at Caffe's points (every ``test_interval`` iterations and after the final
    snapshot) as Caffe runs them (:func:`run_test`); each one's outputs are logged at INFO. They
    are the quantization-aware net's outputs: its ShiftNSearch layers measure shift-N without
    requantizing, so the saved fake-quant model (which requantizes) may score slightly otherwise.

    The solver mode (CPU/GPU) is the process's (``caffe.set_mode_*``), not the solver's.

    Args:
        solver_file: a solver that passes the contract's rules (see :func:`check_solver`;
            test_iter is checked against the ShiftNSearch layers' batch_num) with a
            ``snapshot_prefix``.
        weights_file: a caffemodel to fine-tune from.
        log_dir: the TensorBoard folder, or None for no scalars.
        snapshot: a ``.solverstate`` to resume from (not with ``weights_file``).

    Returns:
        The absolute path of the final snapshot's caffemodel (``<prefix>_iter_<max_iter>.caffemodel``).

    Raises:
        SolverError: the solver breaks a rule (see :func:`check_solver`) or cannot run (a missing
            net file or snapshot folder, an unknown lr_policy, no final snapshot).
        InputMissingError (a FileNotFoundError), ModelError: missing or mismatching weights or
            solver state, a net Caffe cannot build (named layer; checked in a child process).
    """
    if weights_file is not None and snapshot is not None:
        raise ArgumentError("train: give weights_file to fine-tune or snapshot to resume, not both")
    param = _read_solver(solver_file)
    _raise_if(_contract_issues(param, 1, "at least 1") + _training_issues(param) + _file_issues(param),
              solver_file)
    if snapshot is not None:
        _check_solverstate(os.fspath(snapshot))
    if weights_file is not None and not os.path.isfile(weights_file):
        raise InputMissingError(f"weights file {weights_file} not found")
    final = _snapshot_file(param, param.max_iter)
    fileio.check_outputs_are_not_inputs(
        {"weights file": weights_file, "solver state": snapshot, "solver file": solver_file, "net": param.net},
        {"final snapshot": final, "final solver state": final.rsplit(".caffemodel", 1)[0] + ".solverstate"})
    # Caffe aborts the process on a net it cannot build: it builds the net in a child first.
    probe_net(read_prototxt(param.net), param.net)

    if param.eval_type != "classification":
        raise SolverError(_issue(param, "eval_type", "train() runs Caffe's classification TEST only; "
                                                     "use caffe train for another eval_type"))
    solver = _solver_without_caffe_tests(param)
    _raise_if(_check_test_iter(param, solver), solver_file)
    if snapshot is not None:
        solver.restore(os.fspath(snapshot))
    elif weights_file is not None:
        _check_weights_fit(solver.net, os.fspath(weights_file))
        solver.net.copy_from(os.fspath(weights_file))
    run_log = _RunLog(solver, param, os.fspath(log_dir)) if log_dir is not None else None
    log_every = param.display or DEFAULT_LOG_EVERY
    LOG.info("training %s from iteration %d to %d", solver_file, solver.iter, param.max_iter)

    # The TESTs' log lines go above the bar, not through it.
    with logging_redirect_tqdm(), tqdm(total=param.max_iter, initial=solver.iter, unit="iter",
                                       desc="retrain") as bar:
        while solver.iter < param.max_iter:
            iteration = solver.iter
            if iteration > 0 and iteration % param.test_interval == 0:  # Caffe's TEST point, before the step
                outputs = run_test(solver, param)
                if run_log is not None:
                    run_log.test_step(iteration, outputs)
            solver.step(1)
            if iteration % log_every == 0:
                outputs = _output_scalars(solver.net, "train")
                bar.set_postfix({k.split("/", 1)[1]: f"{v:.4g}" for k, v in outputs.items()}, refresh=False)
                if run_log is not None:
                    run_log.train_step(iteration, outputs)
            bar.update(1)
    # Nothing is left to step: Solve() only ends the run (a snapshot if none at max_iter); then
    # the last TEST, after the snapshot as in Caffe.
    solver.solve()
    if param.max_iter % param.test_interval == 0:
        outputs = run_test(solver, param)
        LOG.info("%s", FINAL_TEST_NOTE)
        if run_log is not None:
            run_log.test_step(param.max_iter, outputs)
    LOG.info("retrained weights: %s", final)
    return final
