"""`amct-retrain`: the retraining steps from the shell, each a thin call into the API.

    amct-retrain config  --model float.prototxt --weights float.caffemodel --output config.json
    amct-retrain prepare --model float.prototxt --weights float.caffemodel --config config.json \\
                         --output-dir retrain/ --max-iter 1000 --test-iter 10
    amct-retrain train   --solver retrain/solver.prototxt --weights retrain/retrain.caffemodel
    amct-retrain save    --model retrain/retrain.prototxt --weights retrain/retrained_iter_1000.caffemodel \\
                         --save-path result/model
    amct-retrain record  --model retrain/retrain.prototxt --weights retrain/retrained_iter_1000.caffemodel
                         (the record of that snapshot again, if a later TEST pass rewrote it)
    amct-retrain mixed-precision --model float.prototxt --weights float.caffemodel --output config.json \\
                         --average-bits 5   (a weight width per layer, 4 or 8, from each layer's sensitivity)
    amct-retrain analyze --model float.prototxt --weights float.caffemodel \\
                         --fake-quant-model result/model_fake_quant_model.prototxt \\
                         --fake-quant-weights result/model_fake_quant_weights.caffemodel --output-dir analysis/
"""
import argparse
import contextlib
import logging
import os
import sys
import zipfile
from collections.abc import Iterator

import numpy as np

import amct_retrain
from amct_retrain import solver as amct_solver
from amct_retrain.errors import AnalysisError, InputMissingError
from amct_retrain.fileio import check_outputs_are_not_inputs

LOG = logging.getLogger(__name__)


def _config(args: argparse.Namespace) -> None:
    amct_retrain.create_quant_retrain_config(args.output, args.model, args.weights, args.simplified_config)


def _prepare(args: argparse.Namespace) -> None:
    out = args.output_dir
    files = {name: os.path.join(out, name) for name in
             ("retrain.prototxt", "retrain.caffemodel", "record.txt", "solver.prototxt")}
    check_outputs_are_not_inputs({"model file": args.model, "weights file": args.weights, "config file": args.config},
                                 files)
    amct_retrain.create_quant_retrain_model(args.model, args.weights, args.config, files["retrain.prototxt"],
                                            files["retrain.caffemodel"], files["record.txt"])
    amct_solver.create_solver(files["solver.prototxt"], files["retrain.prototxt"], max_iter=args.max_iter,
                              test_iter=args.test_iter, base_lr=args.base_lr,
                              snapshot_prefix=os.path.join(out, "retrained"))
    amct_solver.check_solver(files["solver.prototxt"], args.config)
    LOG.info("next: amct-retrain train --solver %s --weights %s   (or: caffe train -solver %s -weights %s)",
             files["solver.prototxt"], files["retrain.caffemodel"], files["solver.prototxt"],
             files["retrain.caffemodel"])


@contextlib.contextmanager
def _caffe_log_in(path: str) -> Iterator[None]:
    """While the block runs, Caffe's log (glog writes it to file descriptor 2) goes to ``path``;
    Python's ``sys.stderr`` (the progress bar) and the log handlers writing to it keep the console."""
    with open(path, "w", encoding="utf-8") as log:
        sys.stderr.flush()
        console = os.fdopen(os.dup(2), "w")
        os.dup2(log.fileno(), 2)
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr]
    saved_stderr, sys.stderr = sys.stderr, console
    for handler in handlers:
        handler.setStream(console)
    failed = True
    try:
        yield
        failed = False
    finally:
        console.flush()
        os.dup2(console.fileno(), 2)
        sys.stderr = saved_stderr
        for handler in handlers:
            handler.setStream(saved_stderr)
        console.close()
        if failed and os.path.getsize(path) == 0:
            os.remove(path)  # a run refused before Caffe logged anything leaves no file behind


def _train(args: argparse.Namespace) -> None:
    caffe_log = args.caffe_log or amct_solver.caffe_log_file(args.solver)
    LOG.info("Caffe's log: %s", caffe_log)
    with _caffe_log_in(caffe_log):
        snapshot = amct_solver.train(args.solver, args.weights, log_dir=args.log_dir, snapshot=args.snapshot)
    LOG.info("final snapshot: %s", snapshot)


def _save(args: argparse.Namespace) -> None:
    amct_retrain.save_quant_retrain_model(args.model, args.weights, args.type, args.save_path, args.record)


def _record(args: argparse.Namespace) -> None:
    from amct_retrain.saver import regenerate_record

    regenerate_record(args.model, args.weights)


def _reference(args: argparse.Namespace) -> None:
    from amct_retrain.reference import ReferenceExecutor

    executor = ReferenceExecutor(args.model, args.weights)
    totals: dict[str, float] = {}
    for _ in range(args.iterations):
        for name, value in executor.forward().items():
            if value.size == 1:
                totals[name] = totals.get(name, 0.0) + float(value.ravel()[0])
    for name, total in totals.items():
        LOG.info("%s = %.6g (mean of %d batches, integer arithmetic)", name, total / args.iterations,
                 args.iterations)


def _export_onnx(args: argparse.Namespace) -> None:
    from amct_retrain.export import export_onnx

    export_onnx(args.model, args.weights, args.output, mode=args.mode)
    LOG.info("%s ONNX model written to %s", args.mode, args.output)


def _calibrate(args: argparse.Namespace) -> None:
    import caffe
    from tqdm import tqdm

    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    config = args.config or os.path.join(out, "calibration_config.json")
    if not args.config:
        skip = [name for name in (args.skip_layers or "").split(",") if name]
        amct_retrain.create_quant_config(config, args.model, args.weights, skip_layers=skip, batch_num=args.batch_num,
                                         activation_offset=not args.symmetric, config_defination=args.simplified_config)
    files = {name: os.path.join(out, name) for name in ("record.txt", "calibration.prototxt", "calibration.caffemodel")}
    graph = amct_retrain.init(config, args.model, args.weights, files["record.txt"])
    amct_retrain.quantize_model(graph, files["calibration.prototxt"], files["calibration.caffemodel"])
    net = caffe.Net(files["calibration.prototxt"], caffe.TEST, weights=files["calibration.caffemodel"])
    # The validated config's batch_num (1 where the config leaves it out).
    for _ in tqdm(range(graph.config.batch_num), desc="calibration", unit="batch"):
        net.forward()
    save_path = os.path.join(out, "result", os.path.splitext(os.path.basename(args.model))[0])
    amct_retrain.save_model(graph, args.type, save_path)


def _convert(args: argparse.Namespace) -> None:
    amct_retrain.convert_model(args.model, args.weights, args.record, args.save_path)


def _auto_calibrate(args: argparse.Namespace) -> None:
    from amct_retrain.auto_calibration import OutputBlobEvaluator

    evaluator = OutputBlobEvaluator(args.metric_blob, args.test_iter, args.batch_num, args.max_loss)
    amct_retrain.accuracy_based_auto_calibration(args.model, args.weights, evaluator, args.config, args.record,
                                                 args.save_dir)


def _mixed_precision(args: argparse.Namespace) -> None:
    from amct_retrain.mixed_precision import search_mixed_precision

    result = search_mixed_precision(args.model, args.weights, args.output, average_weight_bits=args.average_bits,
                                    size_bytes=args.size_bytes, candidate_bits=args.candidate_bits,
                                    activation_bits=args.activation_bits, batch_num=args.batch_num)
    LOG.info("weight bits %s: average %.3f, %d bytes; next: amct-retrain prepare --config %s", result.bits,
             result.average_bits, result.size_bytes, args.output)


def _analyze(args: argparse.Namespace) -> None:
    inputs = None
    if args.inputs:
        inputs = split_batches(_read_npz(args.inputs), args.iterations, args.inputs)
    analysis = amct_retrain.analyze(args.model, args.weights, args.fake_quant_model, args.fake_quant_weights,
                                    args.iterations, args.output_dir, inputs=inputs, log_dir=args.log_dir)
    worst = analysis["layers"][0]
    LOG.info("worst layer: %s (SQNR %.2f dB); report: %s", worst["name"], worst["sqnr_db"],
             os.path.join(args.output_dir, "report.html"))


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of the ``--inputs`` file, by name."""
    if not os.path.isfile(path):
        raise InputMissingError(f"{path}: --inputs file does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise AnalysisError(f"{path}: --inputs is not an .npz of one array per input blob: {err}") from None
    raise AnalysisError(f"{path}: --inputs holds one array (.npy): give an .npz of one array per input blob")


def split_batches(arrays: dict[str, np.ndarray], iterations: int, source: str) -> list[dict[str, np.ndarray]]:
    """``{blob: array}`` split along axis 0 into ``iterations`` equal batches (``--inputs``)."""
    for name, array in arrays.items():
        if array.ndim == 0 or len(array) % iterations:
            raise AnalysisError(f"{source}: array '{name}' of shape {array.shape} does not split into "
                                f"{iterations} equal batches along its first axis (--iterations {iterations})")
    parts = {name: np.split(array, iterations) for name, array in arrays.items()}
    return [{name: parts[name][i] for name in arrays} for i in range(iterations)]


def _model_arguments(parser: argparse.ArgumentParser, model_help: str, weights_help: str) -> None:
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--weights", required=True, help=weights_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amct-retrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantization-aware retraining of Caffe models to INT8.\n\n"
                    "Steps: config -> prepare -> train -> save (see each step's --help).",
        epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")

    p = steps.add_parser("config", help="write the retrain config (JSON) of every quantizable layer")
    _model_arguments(p, "float net prototxt (TRAIN and TEST phases)", "float caffemodel")
    p.add_argument("--output", required=True, help="config JSON to write")
    p.add_argument("--simplified-config", help="optional .yaml/.yml or .cfg simplified config to generate it from")
    p.set_defaults(run=_config)

    p = steps.add_parser("prepare", help="write the quantization-aware model, its weights, the record and a solver")
    _model_arguments(p, "float net prototxt (TRAIN and TEST phases)", "float caffemodel")
    p.add_argument("--config", required=True, help="retrain config JSON (from the config step)")
    p.add_argument("--output-dir", required=True, help="folder for retrain.prototxt, retrain.caffemodel, "
                                                       "record.txt and solver.prototxt (created if missing)")
    p.add_argument("--max-iter", type=int, default=1000, help="retraining iterations (default %(default)s)")
    p.add_argument("--test-iter", type=int, default=1,
                   help="TEST batches at the end; at least the config's batch_num (default %(default)s)")
    p.add_argument("--base-lr", type=float, default=0.001, help="learning rate (default %(default)s)")
    p.set_defaults(run=_prepare)

    p = steps.add_parser("train", help="retrain through pycaffe with a progress bar, each TEST's mean outputs and "
                                       "TensorBoard logs; Caffe's own log goes to a file")
    p.add_argument("--solver", required=True, help="solver prototxt (from the prepare step)")
    p.add_argument("--weights", help="initial caffemodel (retrain.caffemodel from the prepare step)")
    p.add_argument("--snapshot", help="a .solverstate to resume from (instead of --weights)")
    p.add_argument("--log-dir", help="TensorBoard log folder")
    p.add_argument("--caffe-log", help="file for Caffe's own log (default: caffe_train.log beside the snapshots)")
    p.set_defaults(run=_train)

    p = steps.add_parser("save", help="write the fake-quant and deploy models from the retrained weights")
    _model_arguments(p, "the quantization-aware prototxt (retrain.prototxt)",
                     "the final snapshot caffemodel of the retraining")
    p.add_argument("--save-path", required=True, help="output prefix, e.g. result/model")
    p.add_argument("--record", help="record file (default: the one the model's layers write)")
    p.add_argument("--type", default="Both", choices=("Fakequant", "Deploy", "Both"), help="default %(default)s")
    p.set_defaults(run=_save)

    p = steps.add_parser("record", help="write the record of a snapshot again (one TEST pass of the retrain model "
                                        "with its weights), e.g. after caffe test rewrote it")
    _model_arguments(p, "the quantization-aware prototxt (retrain.prototxt)", "the snapshot caffemodel to save later")
    p.set_defaults(run=_record)

    p = steps.add_parser("reference", help="run a deploy model with integer arithmetic (the reference executor)")
    _model_arguments(p, "deploy prototxt (model_deploy_model.prototxt)",
                     "deploy caffemodel (model_deploy_weights.caffemodel)")
    p.add_argument("--iterations", type=int, default=1, help="batches to run from the data layers (default %(default)s)")
    p.set_defaults(run=_reference)

    p = steps.add_parser("export-onnx", help="write a deploy model as an ONNX model (onnxruntime)")
    _model_arguments(p, "deploy prototxt (model_deploy_model.prototxt)",
                     "deploy caffemodel (model_deploy_weights.caffemodel)")
    p.add_argument("--output", required=True, help="ONNX file to write")
    p.add_argument("--mode", choices=("standard", "exact"), default="standard",
                   help="standard: QDQ that onnxruntime runs with integer kernels (fast); exact: the deploy "
                        "model's integer arithmetic bit for bit (default %(default)s)")
    p.set_defaults(run=_export_onnx)

    p = steps.add_parser("calibrate", help="post-training calibration: factors from a few TEST batches, then "
                                           "the fake-quant and deploy models")
    _model_arguments(p, "float net prototxt whose TEST phase reads calibration data", "float caffemodel")
    p.add_argument("--output-dir", required=True, help="folder for the config, record, calibration model and "
                                                       "result/ (created if missing)")
    p.add_argument("--config", help="an existing calibration config JSON (else one is written)")
    p.add_argument("--simplified-config", help=".yaml/.yml or .cfg simplified config to generate the config from")
    p.add_argument("--batch-num", type=int, default=1, help="calibration batches (default %(default)s)")
    p.add_argument("--skip-layers", help="comma-separated layers to keep in float")
    p.add_argument("--symmetric", action="store_true", help="symmetric activations (activation_offset false)")
    p.add_argument("--type", default="Both", choices=("Fakequant", "Deploy", "Both"), help="default %(default)s")
    p.set_defaults(run=_calibrate)

    p = steps.add_parser("convert", help="the fake-quant and deploy models from a float model and your own record")
    _model_arguments(p, "float net prototxt", "float caffemodel")
    p.add_argument("--record", required=True, help="record file with scale_d, offset_d, scale_w, shift_bit per layer")
    p.add_argument("--save-path", required=True, help="output prefix, e.g. result/model")
    p.set_defaults(run=_convert)

    p = steps.add_parser("auto-calibrate", help="calibration that keeps the most sensitive layers in float until "
                                                "a metric output of the TEST phase is within --max-loss of float")
    _model_arguments(p, "float net prototxt whose TEST phase outputs the metric", "float caffemodel")
    p.add_argument("--config", required=True, help="calibration config JSON (amct-retrain calibrate writes one)")
    p.add_argument("--record", required=True, help="record file to write")
    p.add_argument("--save-dir", required=True, help="folder for the best models, sensitivity.json, history.json")
    p.add_argument("--metric-blob", default="accuracy", help="scalar TEST output, higher is better (default %(default)s)")
    p.add_argument("--test-iter", type=int, default=1, help="TEST batches per evaluation (default %(default)s)")
    p.add_argument("--batch-num", type=int, default=1, help="calibration batches (default %(default)s)")
    p.add_argument("--max-loss", type=float, default=0.002, help="accepted metric loss (default %(default)s)")
    p.set_defaults(run=_auto_calibrate)

    p = steps.add_parser("mixed-precision", help="a weight bit width per layer under a budget (average bits or "
                                                 "bytes), from each layer's sensitivity; writes the retrain config")
    _model_arguments(p, "float net prototxt whose TEST phase reads calibration data", "float caffemodel")
    p.add_argument("--output", required=True, help="retrain config JSON to write (mixed_precision.json beside it)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--average-bits", type=float, help="average weight width over all weights, e.g. 5")
    budget.add_argument("--size-bytes", type=int, help="the weights' size packed at their widths")
    p.add_argument("--candidate-bits", type=int, nargs="+", default=[4, 8], help="default %(default)s")
    p.add_argument("--activation-bits", type=int, default=8, help="every layer's activations (default %(default)s)")
    p.add_argument("--batch-num", type=int, default=1, help="calibration batches per trial (default %(default)s)")
    p.set_defaults(run=_mixed_precision)

    p = steps.add_parser("analyze", help="per-layer report: the float and the fake-quant model on the same TEST "
                                         "batches (cosine, SQNR, clipping, weight ranges, shift-N)")
    _model_arguments(p, "float net prototxt (its TEST phase is run)", "float caffemodel")
    p.add_argument("--fake-quant-model", required=True, help="model_fake_quant_model.prototxt (from save)")
    p.add_argument("--fake-quant-weights", required=True, help="model_fake_quant_weights.caffemodel (from save)")
    p.add_argument("--output-dir", required=True, help="folder for analysis.json and report.html (created if missing)")
    p.add_argument("--iterations", type=int, default=1, help="TEST batches (default %(default)s)")
    p.add_argument("--inputs", help="for nets fed by Input layers: an .npz of one array per input blob, split "
                                    "along axis 0 into --iterations batches")
    p.add_argument("--log-dir", help="TensorBoard folder for the per-layer SQNR and cosine")
    p.set_defaults(run=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.run(args)
    except (ValueError, OSError) as err:
        print(f"amct-retrain {args.step}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
