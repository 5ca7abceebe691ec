"""The bad-input corpus: each case writes its inputs into a fresh folder, makes one public call
or CLI step, and names what the error message must hold (file paths by role, layer names,
fields). tests/test_bad_inputs.py runs every case in a worker process (worker.py) and checks
that the call raised an :class:`~amct_retrain.errors.AmctError` holding those names, that its
inputs are unchanged and that no output or temp file appeared.
"""
import os
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from caffe.proto import caffe_pb2
from google.protobuf import text_format

from tests import nets

FLOAT = nets.FLOAT_NET % {"fc": 10}


@dataclass(frozen=True)
class Case:
    """``prepare(env)`` writes the inputs and returns {role: path}; ``call(files)`` makes the call;
    the message must hold each of ``names``: a role of ``files`` (its path) or a literal string."""
    name: str
    prepare: Callable[["Env"], dict[str, str]]
    call: Callable[[dict[str, str]], None]
    names: tuple[str, ...]


class Env:
    """A case's folder and the assets (tests/bad_inputs/assets.py) to copy from."""

    def __init__(self, folder: pathlib.Path, assets: pathlib.Path) -> None:
        self.dir, self.assets = folder, assets

    def copy(self, asset: str, name: str | None = None) -> str:
        target = self.dir / (name or pathlib.Path(asset).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.assets / asset, target)
        return str(target)

    def write(self, name: str, data: str | bytes) -> str:
        target = self.dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.write_bytes if isinstance(data, bytes) else target.write_text)(data)
        return str(target)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def float_files(self, model: str | bytes | None = None) -> dict[str, str]:
        """A float model (``model``: its text instead of the valid one), its weights and configs."""
        files = {"model": self.write("float.prototxt", model) if model is not None else self.copy("float.prototxt"),
                 "weights": self.copy("float.caffemodel"), "rconfig": self.copy("retrain_config.json"),
                 "cconfig": self.copy("calib_config.json"), "record": self.copy("record.txt", "record_in.txt")}
        files.update(out=self.path("out"), new_record=self.path("out/record.txt"))
        return files

    def analysis_files(self, model: str | bytes | None = None) -> dict[str, str]:
        """The float model (``model``: its text instead), its saved fake-quant model and an output folder."""
        return {"model": self.write("float.prototxt", model) if model is not None else self.copy("float.prototxt"),
                "weights": self.copy("float.caffemodel"),
                "fq_model": self.copy("result/model_fake_quant_model.prototxt", "fq.prototxt"),
                "fq_weights": self.copy("result/model_fake_quant_weights.caffemodel", "fq.caffemodel"),
                "out": self.path("analysis")}

    def retrained_files(self) -> dict[str, str]:
        """The retrained model, its final snapshot and record (and the saved deploy model)."""
        return {"model": self.copy("retrain.prototxt"), "weights": self.copy("snap_iter_4.caffemodel"),
                "record": self.copy("record.txt"), "save_path": self.path("result/model"),
                "deploy_model": self.copy("result/model_deploy_model.prototxt", "deploy.prototxt"),
                "deploy_weights": self.copy("result/model_deploy_weights.caffemodel", "deploy.caffemodel")}


def edit(old: str, new: str, text: str = FLOAT) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def cli(*argv: str) -> None:
    """A CLI step as ``amct-retrain`` runs it, raising what the step raises."""
    from amct_retrain import cli as amct_cli

    args = amct_cli.build_parser().parse_args(list(argv))
    args.run(args)


# --------------------------------------------------------------------------- bad float nets

HAS, LACKS_BUILDS, LACKS_FAILS = "has", "lacks, builds", "lacks, fails"
INPUT_NET = """name: "deploy_style"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
"""
NOTHING_TO_QUANTIZE = """name: "no_quant"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 dim: 6 } } }
layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }
layer { name: "loss" type: "EuclideanLoss" bottom: "r" bottom: "target" top: "loss" }
"""

# name -> (model text, what the message names besides the file, whether the net has the layers the
# configs and the record name (conv1, conv2, fc): HAS; LACKS_BUILDS: Caffe builds it, so every call that
# reads those files names them; LACKS_FAILS: Caffe cannot build it, which the calls that check the net
# before those files say)
BAD_NETS: dict[str, tuple[str | bytes, tuple[str, ...], str]] = {
    "empty": ("", ("no layers",), HAS),
    "comments_only": ("# a net\n\n", ("no layers",), HAS),
    "syntax_error": (FLOAT.replace('type: "ReLU"', "type: ", 1), (":",), HAS),
    "binary": (bytes(range(256)) * 4, ("UTF-8",), HAS),
    "unknown_field": (edit("kernel_size: 3 weight", "kernel_sise: 3 weight"), ("kernel_sise",), HAS),
    "round_mode": (edit("pool: MAX", "pool: MAX round_mode: FLOOR"), ("ceil_mode",), HAS),
    "dangling_bottom": (edit('bottom: "pool" top: "fc"', 'bottom: "nope" top: "fc"'), ("'fc'", "nope"), HAS),
    "unknown_type": (edit('name: "relu2" type: "ReLU"', 'name: "relu2" type: "Relu"'), ("'relu2'", "Relu"), HAS),
    "top_twice": (edit('name: "relu1" type: "ReLU" bottom: "conv1"', 'name: "relu1" type: "ReLU" bottom: "data"'),
                  ("'relu1'", "conv1"), HAS),
    "duplicate_name": (edit('layer { name: "relu2" type: "ReLU"', 'layer { name: "relu1" type: "ReLU"'),
                       ("'relu1'",), HAS),
    "huge_num_output": (edit("num_output: 6 kernel_size: 3", "num_output: 2147483647 kernel_size: 3"),
                        ("'conv1'",), HAS),
    "kernel_too_large": (edit("num_output: 6 kernel_size: 3", "num_output: 6 kernel_size: 20"), ("'conv1'",), HAS),
    "group_not_dividing": (edit("num_output: 6 kernel_size: 3", "num_output: 6 kernel_size: 3 group: 4"),
                           ("'conv1'", "group"), HAS),
    "negative_dim": (INPUT_NET.replace("dim: 6 dim: 8", "dim: -6 dim: 8"), ("'data'",), LACKS_FAILS),
    "nothing_to_quantize": (NOTHING_TO_QUANTIZE, ("nothing to quantize", "ReLU"), LACKS_BUILDS),
}

# The calls that read a float model: name -> (call, the role of the file naming the net's layers that
# the call reads, or None, and whether it reads it before Caffe builds the net)
FLOAT_CALLS: dict[str, tuple[Callable[[dict[str, str]], None], str | None, bool]] = {}


def _float_call(name: str, layers_file: str | None = None, before_caffe: bool = False):
    def register(fn):
        FLOAT_CALLS[name] = (fn, layers_file, before_caffe)
        return fn
    return register


@_float_call("create_quant_retrain_config")
def _create_retrain_config(f):
    import amct_retrain
    amct_retrain.create_quant_retrain_config(f["out"] + "/config.json", f["model"], f["weights"])


@_float_call("create_quant_config")
def _create_calib_config(f):
    import amct_retrain
    amct_retrain.create_quant_config(f["out"] + "/config.json", f["model"], f["weights"])


@_float_call("create_quant_retrain_model", "rconfig", before_caffe=True)
def _create_retrain_model(f):
    import amct_retrain
    amct_retrain.create_quant_retrain_model(f["model"], f["weights"], f["rconfig"], f["out"] + "/retrain.prototxt",
                                            f["out"] + "/retrain.caffemodel", f["new_record"])


@_float_call("init", "cconfig")
def _init(f):
    import amct_retrain
    amct_retrain.init(f["cconfig"], f["model"], f["weights"], f["new_record"])


@_float_call("convert_model", "record")
def _convert(f):
    import amct_retrain
    amct_retrain.convert_model(f["model"], f["weights"], f["record"], f["out"] + "/model")


@_float_call("accuracy_based_auto_calibration", "cconfig")
def _auto(f):
    import amct_retrain
    from amct_retrain.auto_calibration import OutputBlobEvaluator
    amct_retrain.accuracy_based_auto_calibration(f["model"], f["weights"], OutputBlobEvaluator("loss"), f["cconfig"],
                                                 f["new_record"], f["out"])


@_float_call("cli config")
def _cli_config(f):
    cli("config", "--model", f["model"], "--weights", f["weights"], "--output", f["out"] + "/config.json")


@_float_call("cli prepare", "rconfig", before_caffe=True)
def _cli_prepare(f):
    cli("prepare", "--model", f["model"], "--weights", f["weights"], "--config", f["rconfig"], "--output-dir", f["out"])


@_float_call("cli auto-calibrate", "cconfig")
def _cli_auto(f):
    cli("auto-calibrate", "--model", f["model"], "--weights", f["weights"], "--config", f["cconfig"], "--record",
        f["new_record"], "--save-dir", f["out"], "--metric-blob", "loss")


@_float_call("cli calibrate")
def _cli_calibrate(f):
    cli("calibrate", "--model", f["model"], "--weights", f["weights"], "--output-dir", f["out"])


def _bad_net_cases() -> list[Case]:
    cases = []
    for net_name, (text, names, layers) in BAD_NETS.items():
        for call_name, (call, layers_file, before_caffe) in FLOAT_CALLS.items():
            expected = ("model",) + names
            if layers_file and (layers == LACKS_BUILDS or (layers == LACKS_FAILS and before_caffe)):
                expected = (layers_file, "conv")  # it names layers the net lacks
            cases.append(Case(f"{call_name}: {net_name} net", lambda env, text=text: env.float_files(text), call,
                              expected))
    return cases


# --------------------------------------------------------------------------- bad weights


def _weights_variant(kind: str):
    def prepare(env: Env) -> dict[str, str]:
        files = env.float_files()
        if kind == "garbage":
            env.write("float.caffemodel", b"\x08\x96\x01garbage\xff\xff\xff\xff" * 50)
        elif kind == "empty":
            env.write("float.caffemodel", b"")
        elif kind == "truncated":
            data = (env.assets / "float.caffemodel").read_bytes()
            env.write("float.caffemodel", data[: len(data) // 2])
        elif kind == "other_model":
            env.copy("other.caffemodel", "float.caffemodel")
        elif kind == "missing":
            os.remove(files["weights"])
        elif kind == "nan":
            net = caffe_pb2.NetParameter.FromString((env.assets / "float.caffemodel").read_bytes())
            conv2 = next(layer for layer in net.layer if layer.name == "conv2")
            conv2.blobs[0].data[3] = float("nan")
            env.write("float.caffemodel", net.SerializeToString())
        return files
    return prepare


WEIGHT_CASES = {  # kind -> (calls, names)
    "garbage": (("create_quant_retrain_model", "init", "convert_model", "accuracy_based_auto_calibration"),
                ("weights",)),
    "empty": (("create_quant_retrain_model", "init", "convert_model", "accuracy_based_auto_calibration"),
              ("weights", "'conv1'")),
    "truncated": (("create_quant_retrain_model", "init", "convert_model", "accuracy_based_auto_calibration"),
                  ("weights",)),
    "other_model": (("create_quant_retrain_model", "init", "convert_model", "accuracy_based_auto_calibration"),
                    ("weights", "'fc'")),
    "missing": (("create_quant_retrain_config", "create_quant_config", "create_quant_retrain_model", "init",
                 "convert_model", "accuracy_based_auto_calibration", "cli config"), ("weights",)),
    "nan": (("create_quant_retrain_model", "convert_model"), ("weights", "'conv2'")),
}


def _weight_cases() -> list[Case]:
    return [Case(f"{call}: {kind} weights", _weights_variant(kind), FLOAT_CALLS[call][0], names)
            for kind, (calls, names) in WEIGHT_CASES.items() for call in calls]


# --------------------------------------------------------------------------- bad config JSON

BAD_CONFIGS = {  # name -> (text, names)
    "not_json": ("{version: 1,", ("config", ":1:")),
    "array": ("[1, 2]", ("config", "JSON object")),
    "version_2": ('{"version": 2}', ("config", "version")),
    "unknown_layer": ('{"version": 1, "conv9": {}}', ("config", "'conv9'")),
    "duplicate_key": ('{"version": 1, "batch_num": 1, "batch_num": 2}', ("config", "batch_num")),
    "batch_num_0": ('{"version": 1, "batch_num": 0}', ("config", "batch_num")),
    "not_quantizable": ('{"version": 1, "relu1": {"retrain_enable": true, "quant_enable": true}}',
                        ("config", "'relu1'")),
}
HUGE = "1" + "0" * 400  # a JSON integer no float holds


def _retrain_entry(data: str) -> str:
    return ('{"version": 1, "conv1": {"retrain_enable": true, "retrain_data_config": {"algo": "ulq_quantize", '
            + data + '}, "retrain_weight_config": {"algo": "arq_retrain"}}}')


def _calibration_entry(activation: str) -> str:
    return ('{"version": 1, "conv1": {"quant_enable": true, "activation_quant_params": {"algo": "ifmr", '
            + activation + '}, "weight_quant_params": {"wts_algo": "arq_quantize"}}}')


RETRAIN_CONFIG_ONLY = {
    "clip_order": (_retrain_entry('"clip_max": -1.0, "clip_min": 1.0'), ("config", "'conv1'", "clip_min")),
    "huge_number": (_retrain_entry(f'"clip_max": {HUGE}, "clip_min": -1.0'), ("config", "'conv1'", "clip_max")),
    "none_enabled": ('{"version": 1, "conv1": {"retrain_enable": false}}', ("config", "nothing to retrain")),
}
CALIB_CONFIG_ONLY = {
    "percentile": (_calibration_entry('"max_percentile": 2.0'), ("config", "'conv1'", "max_percentile")),
    "huge_number": (_calibration_entry(f'"search_step": {HUGE}'), ("config", "'conv1'", "search_step")),
}


def _config_cases() -> list[Case]:
    cases = []

    def prepare_with(key, text):
        def prepare(env):
            files = env.float_files()
            files[key] = env.write(f"{key}.json", text)
            files["config"] = files[key]
            return files
        return prepare

    for name, (text, names) in {**BAD_CONFIGS, **RETRAIN_CONFIG_ONLY}.items():
        cases.append(Case(f"create_quant_retrain_model: config {name}", prepare_with("rconfig", text),
                          FLOAT_CALLS["create_quant_retrain_model"][0], names))
    for name, (text, names) in {**BAD_CONFIGS, **CALIB_CONFIG_ONLY}.items():
        for call in ("init", "accuracy_based_auto_calibration"):
            cases.append(Case(f"{call}: config {name}", prepare_with("cconfig", text), FLOAT_CALLS[call][0], names))
        cases.append(Case(f"cli auto-calibrate: config {name}", prepare_with("cconfig", text),
                          lambda f: cli("auto-calibrate", "--model", f["model"], "--weights", f["weights"], "--config",
                                        f["cconfig"], "--record", f["new_record"], "--save-dir", f["out"],
                                        "--metric-blob", "loss"), names))
        cases.append(Case(f"cli calibrate --config: config {name}", prepare_with("cconfig", text),
                          lambda f: cli("calibrate", "--model", f["model"], "--weights", f["weights"], "--config",
                                        f["cconfig"], "--output-dir", f["out"]), names))
    return cases


# --------------------------------------------------------------------------- simplified configs

BAD_SIMPLIFIED = {  # file name -> (text, names)
    "q.yaml": ("batch_num: [1\n", ("simplified", ":1:")),
    "unknown.yaml": ("bacth_num: 2\n", ("simplified", "bacth_num")),
    "type.yaml": ("batch_num: two\n", ("simplified", "batch_num")),
    "skip.yaml": ("skip_layers: [conv9]\n", ("simplified", "conv9")),
    "dup.yaml": ("batch_num: 1\nbatch_num: 2\n", ("simplified", "duplicate")),
    "q.txt": ("batch_num: 1\n", ("simplified", ".txt")),
    "q.cfg": ("batch_num: 1 {\n", ("simplified", ":1")),
    "override.cfg": ('override_layer_configs { layer_name: "relu1" }\n', ("simplified", "'relu1'")),
    "all_skipped.yaml": ("skip_layer_types: [Convolution, InnerProduct]\n", ("model", "nothing to quantize")),
}


def _simplified_cases() -> list[Case]:
    import amct_retrain

    def prepare_with(name, text):
        def prepare(env):
            files = env.float_files()
            files["simplified"] = env.write(name, text)
            return files
        return prepare

    cases = []
    for name, (text, names) in BAD_SIMPLIFIED.items():
        cases.append(Case(f"create_quant_retrain_config: simplified {name}", prepare_with(name, text),
                          lambda f: amct_retrain.create_quant_retrain_config(f["out"] + "/c.json", f["model"],
                                                                             f["weights"], f["simplified"]), names))
        if name not in ("override.cfg",):
            cases.append(Case(f"create_quant_config: simplified {name}", prepare_with(name, text),
                              lambda f: amct_retrain.create_quant_config(f["out"] + "/c.json", f["model"], f["weights"],
                                                                         config_defination=f["simplified"]), names))
    return cases


# --------------------------------------------------------------------------- saving a retrained model


def _save(f, save_type="Both"):
    import amct_retrain
    amct_retrain.save_quant_retrain_model(f["model"], f["weights"], save_type, f["save_path"], f["record"])


def _cli_save(f):
    cli("save", "--model", f["model"], "--weights", f["weights"], "--save-path", f["save_path"], "--record", f["record"])


def _edit_blob(env: Env, files: dict[str, str], layer: str, blob: int, index: int, value: float) -> None:
    net = caffe_pb2.NetParameter.FromString(pathlib.Path(files["weights"]).read_bytes())
    target = next(entry for entry in net.layer if entry.name == layer)
    target.blobs[blob].data[index] = value
    env.write(pathlib.Path(files["weights"]).name, net.SerializeToString())


def _save_variant(kind: str):
    def prepare(env: Env) -> dict[str, str]:
        f = env.retrained_files()
        if kind == "empty_save_path":
            f["save_path"] = ""
        elif kind == "folder_save_path":
            f["save_path"] = env.path("result") + "/"
        elif kind == "existing_folder_save_path":
            os.makedirs(env.path("result/model"))
        elif kind == "other_models_prototxt":
            f["model"] = env.copy("other_run/retrain.prototxt", "other_retrain.prototxt")
        elif kind == "float_prototxt":
            f["model"] = env.copy("float.prototxt")
        elif kind == "other_weights":
            f["weights"] = env.copy("other_run/retrain.caffemodel", "other.caffemodel")
        elif kind == "nan_master":
            _edit_blob(env, f, "conv2_arq", 1, 5, float("nan"))
        elif kind == "inf_clip_nan_pair":
            _edit_blob(env, f, "conv1_ulq", 0, 0, float("inf"))
            for i in (1, 2):
                _edit_blob(env, f, "conv1_ulq", 2, i, float("nan"))
        elif kind == "garbage_weights":
            env.write("snap_iter_4.caffemodel", b"\x0a\xff\xff\xff\x0fxx")
        elif kind == "garbage_record":
            env.write("record.txt", "record { key: \"conv1\" value { scale_d: x } }")
        elif kind == "record_missing_layer":
            text = pathlib.Path(f["record"]).read_text()
            env.write("record.txt", text[: text.index('record {\n  key: "fc"')])
        elif kind == "missing_record":
            os.remove(f["record"])
        elif kind == "save_path_is_snapshot":
            f["weights"] = env.copy("snap_iter_4.caffemodel", "m_fake_quant_weights.caffemodel")
            f["save_path"] = env.path("m")
        elif kind == "save_path_is_record":
            f["record"] = env.copy("record.txt", "m_quant.json")
            f["save_path"] = env.path("m")
        elif kind == "save_path_is_prototxt_symlink":
            os.symlink(f["model"], env.path("m_deploy_model.prototxt"))
            f["save_path"] = env.path("m")
        elif kind == "save_path_is_snapshot_hardlink":
            os.link(f["weights"], env.path("m_deploy_weights.caffemodel"))
            f["save_path"] = env.path("m")
        return f
    return prepare


SAVE_CASES = {  # kind -> names
    "empty_save_path": ("save_path",),
    "folder_save_path": ("save_path", "folder"),
    "existing_folder_save_path": ("save_path",),
    "other_models_prototxt": ("weights", "'fc'"),
    "float_prototxt": ("model", "no quantized layers"),
    "other_weights": ("weights", "'fc"),
    "nan_master": ("weights", "'conv2'", "master"),
    "inf_clip_nan_pair": ("weights", "'conv1'", "clip"),
    "garbage_weights": ("weights",),
    "garbage_record": ("record", "scale_d"),
    "record_missing_layer": ("record", "'fc'"),
    "missing_record": ("record",),
    "save_path_is_snapshot": ("weights", "inputs are never overwritten"),
    "save_path_is_record": ("record", "inputs are never overwritten"),
    "save_path_is_prototxt_symlink": ("model", "inputs are never overwritten"),
    "save_path_is_snapshot_hardlink": ("weights", "inputs are never overwritten"),
}


def _save_cases() -> list[Case]:
    cases = [Case(f"save_quant_retrain_model: {kind}", _save_variant(kind), _save, names)
             for kind, names in SAVE_CASES.items()]
    cases += [Case(f"cli save: {kind}", _save_variant(kind), _cli_save, names)
              for kind, names in SAVE_CASES.items() if kind in ("folder_save_path", "other_models_prototxt",
                                                                "nan_master", "save_path_is_snapshot_hardlink")]
    cases.append(Case("save_quant_retrain_model: save_type", _save_variant(""),
                      lambda f: _save(f, "Int8"), ("save_type", "Int8")))
    return cases


# --------------------------------------------------------------------------- outputs that are inputs


def _same_file_cases() -> list[Case]:
    import amct_retrain
    from amct_retrain import solver

    def linked(kind: str, role: str, target_name: str):
        def prepare(env):
            f = env.float_files()
            target = env.path(target_name)
            if kind == "same":
                f["target"] = f[role]
            elif kind == "symlink":
                os.symlink(f[role], target)
                f["target"] = target
            else:
                os.link(f[role], target)
                f["target"] = target
            return f
        return prepare

    calls = {
        "create_quant_retrain_config": ("model", lambda f: amct_retrain.create_quant_retrain_config(
            f["target"], f["model"], f["weights"])),
        "create_quant_config": ("weights", lambda f: amct_retrain.create_quant_config(
            f["target"], f["model"], f["weights"])),
        "create_quant_retrain_model (weights out)": ("weights", lambda f: amct_retrain.create_quant_retrain_model(
            f["model"], f["weights"], f["rconfig"], f["out"] + "/r.prototxt", f["target"], f["new_record"])),
        "create_quant_retrain_model (record out)": ("rconfig", lambda f: amct_retrain.create_quant_retrain_model(
            f["model"], f["weights"], f["rconfig"], f["out"] + "/r.prototxt", f["out"] + "/r.caffemodel",
            f["target"])),
        "init (record out)": ("cconfig", lambda f: amct_retrain.init(f["cconfig"], f["model"], f["weights"],
                                                                     f["target"])),
        "create_solver": ("model", lambda f: solver.create_solver(f["target"], f["model"], 10, 1)),
    }
    calls["cli prepare"] = ("rconfig", lambda f: cli(
        "prepare", "--model", f["model"], "--weights", f["weights"], "--config", f["rconfig"], "--output-dir",
        os.path.dirname(f["target"])))
    cases = []
    for call_name, (role, call) in calls.items():
        for kind in ("same", "symlink", "hardlink"):
            target = "record.txt" if call_name == "cli prepare" else "link_target"
            if call_name == "cli prepare" and kind == "same":
                continue  # the step's outputs have fixed names: only a link can be one of its inputs
            cases.append(Case(f"{call_name}: output is the {role} ({kind})", linked(kind, role, target),
                              call, (role, "inputs are never overwritten")))

    def convert_prepare(kind):
        def prepare(env):
            f = env.float_files()
            if kind == "record":
                f["record"] = env.copy("record.txt", "m_quant.json")
            else:
                os.link(f["weights"], env.path("m_fake_quant_weights.caffemodel"))
            f["save_path"] = env.path("m")
            return f
        return prepare

    for kind in ("record", "weights"):
        cases.append(Case(f"convert_model: output is the {kind}", convert_prepare(kind),
                          lambda f: amct_retrain.convert_model(f["model"], f["weights"], f["record"], f["save_path"]),
                          (kind, "inputs are never overwritten")))

    def export_prepare(kind):
        def prepare(env):
            f = env.retrained_files()
            if kind == "same":
                f["onnx"] = f["deploy_weights"]
            elif kind == "symlink":
                os.symlink(f["deploy_model"], env.path("m.onnx"))
                f["onnx"] = env.path("m.onnx")
            else:
                os.link(f["deploy_weights"], env.path("m.onnx"))
                f["onnx"] = env.path("m.onnx")
            return f
        return prepare

    from amct_retrain.export import export_onnx
    for kind in ("same", "symlink", "hardlink"):
        cases.append(Case(f"export_onnx: output is an input ({kind})", export_prepare(kind),
                          lambda f: export_onnx(f["deploy_model"], f["deploy_weights"], f["onnx"]),
                          ("deploy_model" if kind == "symlink" else "deploy_weights", "inputs are never overwritten")))
        cases.append(Case(f"cli export-onnx: output is an input ({kind})", export_prepare(kind),
                          lambda f: cli("export-onnx", "--model", f["deploy_model"], "--weights", f["deploy_weights"],
                                        "--output", f["onnx"]),
                          ("deploy_model" if kind == "symlink" else "deploy_weights", "inputs are never overwritten")))
    return cases


# --------------------------------------------------------------------------- the reference executor and ONNX


def _deploy_variant(kind: str):
    def prepare(env: Env) -> dict[str, str]:
        f = env.retrained_files()
        if kind == "garbage_weights":
            env.write("deploy.caffemodel", b"\x0a\xff\xff\xff\x0fxx")
        elif kind in ("int8_wrong_size", "int8_wrong_shape"):
            net = caffe_pb2.NetParameter.FromString(pathlib.Path(f["deploy_weights"]).read_bytes())
            fc = next(layer for layer in net.layer if layer.name == "fc")
            if kind == "int8_wrong_size":
                fc.blobs[0].int8_data = fc.blobs[0].int8_data[:-7]
            else:  # consistent in itself, but not the layer's input
                fc.blobs[0].shape.dim[1] -= 8
                fc.blobs[0].int8_data = fc.blobs[0].int8_data[: fc.blobs[0].shape.dim[0] * fc.blobs[0].shape.dim[1]]
            env.write("deploy.caffemodel", net.SerializeToString())
        elif kind == "dangling_bottom":
            net = text_format.Parse(pathlib.Path(f["deploy_model"]).read_text(), caffe_pb2.NetParameter())
            relu = next(layer for layer in net.layer if layer.name == "relu2")
            relu.bottom[0] = "nowhere"
            relu.top[0] = "nowhere"
            env.write("deploy.prototxt", text_format.MessageToString(net))
        elif kind == "missing_weights":
            os.remove(f["deploy_weights"])
        return f
    return prepare


DEPLOY_CASES = {
    "garbage_weights": ("deploy_weights",),
    "int8_wrong_size": ("deploy_weights", "'fc'"),
    "int8_wrong_shape": ("deploy_weights", "'fc'"),
    "dangling_bottom": ("deploy_model", "'relu2'"),
    "missing_weights": ("deploy_weights",),
}


def _reference(f):
    from amct_retrain.reference import ReferenceExecutor
    ReferenceExecutor(f["deploy_model"], f["deploy_weights"]).forward()


def _deploy_cases() -> list[Case]:
    from amct_retrain.export import export_onnx
    cases = []
    for kind, names in DEPLOY_CASES.items():
        cases.append(Case(f"ReferenceExecutor: {kind}", _deploy_variant(kind), _reference, names))
        cases.append(Case(f"cli reference: {kind}", _deploy_variant(kind),
                          lambda f: cli("reference", "--model", f["deploy_model"], "--weights", f["deploy_weights"]),
                          names))
        if kind != "dangling_bottom":
            cases.append(Case(f"export_onnx: {kind}", _deploy_variant(kind),
                              lambda f: export_onnx(f["deploy_model"], f["deploy_weights"], f["save_path"] + ".onnx"),
                              names))
    return cases


# --------------------------------------------------------------------------- solvers and training


def _solver_variant(kind: str):
    def prepare(env: Env) -> dict[str, str]:
        f = env.float_files()
        f["retrain_model"] = env.copy("retrain.prototxt")
        f["retrain_weights"] = env.copy("retrain.caffemodel")
        text = (env.assets / "solver.prototxt").read_text()
        text = text.replace(str(env.assets / "retrain.prototxt"), f["retrain_model"])
        text = text.replace(str(env.assets / "snap"), env.path("snap"))
        if kind == "dangling_bottom":
            net = text_format.Parse(pathlib.Path(f["retrain_model"]).read_text(), caffe_pb2.NetParameter())
            fc = next(layer for layer in net.layer if layer.name == "fc_ulq")
            fc.bottom[0] = "nowhere"
            env.write("retrain.prototxt", text_format.MessageToString(net))
        elif kind == "garbage_solver":
            text = "net: \"x\" max_iter: ten\n"
        elif kind == "test_init":
            text += "test_initialization: true\n"
        elif kind == "weights_is_final_snapshot":
            f["retrain_weights"] = env.copy("retrain.caffemodel", "snap_iter_4.caffemodel")
        elif kind == "bad_solverstate":
            f["state"] = env.write("snap_iter_2.solverstate", b"\xff\xff\xff")
        elif kind == "other_weights":
            f["retrain_weights"] = env.copy("other_run/retrain.caffemodel", "other.caffemodel")
        f["solver"] = env.write("solver.prototxt", text)
        return f
    return prepare


def _train(f):
    from amct_retrain import solver
    if "state" in f:
        solver.train(f["solver"], snapshot=f["state"])
    else:
        solver.train(f["solver"], f["retrain_weights"])


SOLVER_CASES = {
    "dangling_bottom": ("retrain_model", "'fc_ulq'"),
    "garbage_solver": ("solver", "max_iter"),
    "test_init": ("solver", "test_initialization"),
    "weights_is_final_snapshot": ("retrain_weights", "inputs are never overwritten"),
    "bad_solverstate": ("state",),
    "other_weights": ("retrain_weights", "'fc"),
}


def _solver_cases() -> list[Case]:
    from amct_retrain import solver
    cases = []
    for kind, names in SOLVER_CASES.items():
        cases.append(Case(f"train: {kind}", _solver_variant(kind), _train, names))
        if kind in ("dangling_bottom", "garbage_solver", "weights_is_final_snapshot"):
            cases.append(Case(f"cli train: {kind}", _solver_variant(kind),
                              lambda f: cli("train", "--solver", f["solver"], "--weights", f["retrain_weights"]), names))
    for kind in ("garbage_solver", "test_init"):
        cases.append(Case(f"check_solver: {kind}", _solver_variant(kind),
                          lambda f: solver.check_solver(f["solver"], f["rconfig"]), SOLVER_CASES[kind]))

    def bad_config(env):
        f = _solver_variant("")(env)
        f["rconfig"] = env.write("rconfig.json", "{oops")
        return f
    cases.append(Case("check_solver: config not JSON", bad_config,
                      lambda f: solver.check_solver(f["solver"], f["rconfig"]), ("rconfig",)))
    return cases


# --------------------------------------------------------------------------- calibration API misuse


def _hardlinked(files: dict, env: Env) -> dict:
    files["link"] = env.path("weights_link.caffemodel")
    os.link(files["weights"], files["link"])
    return files


def _calibration_cases() -> list[Case]:
    import amct_retrain

    def prepare(env):
        return env.float_files()

    def with_graph(env):
        f = env.float_files()
        f["graph"] = amct_retrain.init(f["cconfig"], f["model"], f["weights"], f["new_record"])
        return f

    return [
        Case("save_model: not a graph", prepare, lambda f: amct_retrain.save_model("notagraph", "Both", f["out"] + "/m"),
             ("save_model", "notagraph")),
        Case("quantize_model: not a graph", prepare,
             lambda f: amct_retrain.quantize_model(None, f["out"] + "/c.prototxt", f["out"] + "/c.caffemodel"),
             ("quantize_model",)),
        Case("save_model: before quantize_model", with_graph,
             lambda f: amct_retrain.save_model(f["graph"], "Both", f["out"] + "/m"), ("model", "quantize_model")),
        Case("save_model: save_path a folder", with_graph,
             lambda f: amct_retrain.save_model(f["graph"], "Both", f["out"] + "/"), ("save_path",)),
        Case("save_model: save_type", with_graph,
             lambda f: amct_retrain.save_model(f["graph"], "int8", f["out"] + "/m"), ("save_type", "int8")),
        Case("quantize_model: output is the model", with_graph,
             lambda f: amct_retrain.quantize_model(f["graph"], f["model"], f["out"] + "/c.caffemodel"),
             ("model", "inputs are never overwritten")),
        Case("quantize_model: output is the weights (hard link)", lambda env: _hardlinked(with_graph(env), env),
             lambda f: amct_retrain.quantize_model(f["graph"], f["out"] + "/c.prototxt", f["link"]),
             ("weights", "inputs are never overwritten")),
        Case("convert_model: garbage record", lambda env: {**env.float_files(),
                                                           "record": env.write("r.txt", "record { key: 1 }")},
             FLOAT_CALLS["convert_model"][0], ("record",)),
        Case("convert_model: empty save_path", prepare,
             lambda f: amct_retrain.convert_model(f["model"], f["weights"], f["record"], ""), ("save_path",)),
        Case("cli convert: record missing", lambda env: {**env.float_files(), "record": env.path("none.txt")},
             lambda f: cli("convert", "--model", f["model"], "--weights", f["weights"], "--record", f["record"],
                           "--save-path", f["out"] + "/m"), ("record",)),
    ]


# --------------------------------------------------------------------------- the per-layer analysis


def _analyze(f, iterations=1):
    import amct_retrain
    amct_retrain.analyze(f["model"], f["weights"], f["fq_model"], f["fq_weights"], iterations, f["out"],
                         log_dir=f.get("log_dir"))


def _cli_analyze(f):
    cli("analyze", "--model", f["model"], "--weights", f["weights"], "--fake-quant-model", f["fq_model"],
        "--fake-quant-weights", f["fq_weights"], "--output-dir", f["out"], *(("--inputs", f["inputs"])
                                                                             if "inputs" in f else ()))


def _analysis_variant(kind: str):
    def prepare(env: Env) -> dict[str, str]:
        f = env.analysis_files()
        if kind == "json_is_weights_hardlink":
            os.makedirs(f["out"])
            os.link(f["weights"], os.path.join(f["out"], "analysis.json"))
        elif kind == "report_is_fq_model_symlink":
            os.makedirs(f["out"])
            os.symlink(f["fq_model"], os.path.join(f["out"], "report.html"))
        elif kind == "output_dir_is_a_file":
            f["out"] = env.write("analysis.txt", "not a folder")
        elif kind == "log_dir_is_a_file":
            f["log_dir"] = env.write("tb.txt", "not a folder")
        elif kind == "fq_model_is_float":
            f["fq_model"] = env.copy("float.prototxt", "fq.prototxt")
        elif kind == "fq_garbage_weights":
            env.write("fq.caffemodel", b"\x0a\xff\xff\xff\x0fxx")
        elif kind == "other_float_weights":
            f["weights"] = env.copy("other.caffemodel", "float.caffemodel")
        elif kind == "fq_dangling_bottom":
            net = text_format.Parse(pathlib.Path(f["fq_model"]).read_text(), caffe_pb2.NetParameter())
            relu = next(layer for layer in net.layer if layer.name == "relu2")
            relu.bottom[0] = relu.top[0] = "nowhere"
            env.write("fq.prototxt", text_format.MessageToString(net))
        elif kind == "inputs_not_npz":
            f["inputs"] = env.write("inputs.npz", b"PK\x03\x04 not a zip")
        elif kind == "inputs_missing":
            f["inputs"] = env.path("none.npz")
        return f
    return prepare


ANALYSIS_CASES = {  # kind -> names
    "json_is_weights_hardlink": ("weights", "inputs are never overwritten"),
    "report_is_fq_model_symlink": ("fq_model", "inputs are never overwritten"),
    "output_dir_is_a_file": ("out", "output_dir"),
    "log_dir_is_a_file": ("log_dir", "log_dir"),
    "fq_model_is_float": ("fq_model", "no quantized layer"),
    "fq_garbage_weights": ("fq_weights",),
    "other_float_weights": ("weights", "'fc'"),
    "fq_dangling_bottom": ("fq_model", "'relu2'"),
}
ANALYSIS_BAD_NETS = ("empty", "dangling_bottom", "unknown_type", "duplicate_name", "kernel_too_large",
                     "group_not_dividing")


def _analysis_cases() -> list[Case]:
    cases = [Case(f"analyze: {kind}", _analysis_variant(kind), _analyze, names)
             for kind, names in ANALYSIS_CASES.items()]
    cases.append(Case("analyze: iterations 0", _analysis_variant(""), lambda f: _analyze(f, 0), ("iterations",)))
    for net_name in ANALYSIS_BAD_NETS:
        text, names, _ = BAD_NETS[net_name]
        cases.append(Case(f"analyze: {net_name} float net", lambda env, text=text: env.analysis_files(text),
                          _analyze, ("model",) + names))
    for kind in ("json_is_weights_hardlink", "fq_dangling_bottom", "inputs_not_npz", "inputs_missing"):
        names = ANALYSIS_CASES.get(kind, ("inputs",))
        cases.append(Case(f"cli analyze: {kind}", _analysis_variant(kind), _cli_analyze, names))
    return cases


def all_cases() -> list[Case]:
    cases = (_bad_net_cases() + _weight_cases() + _config_cases() + _simplified_cases() + _save_cases()
             + _same_file_cases() + _deploy_cases() + _solver_cases() + _calibration_cases() + _analysis_cases())
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
