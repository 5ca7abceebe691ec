"""Idempotent source patches applied to the pinned Caffe sdist before it is built.

Each patch checks whether it is already applied, so running this twice is harmless.
Usage: python patch_caffe.py CAFFE_SOURCE_DIR
"""
import pathlib
import sys

# Upstream Caffe reads protobuf files up to INT_MAX bytes; this fork caps them at 512 MB,
# which aborts the process on VGG-16 / FCN-8s weights.
PROTO_LIMIT_OLD = "SetTotalBytesLimit(536870912)"
PROTO_LIMIT_NEW = "SetTotalBytesLimit(2147483647)"

# This fork's `caffe train` lost upstream's branch that copies -weights into the nets.
COPY_LAYERS_FN = '''
// Load the weights from the specified caffemodel(s) into the train and test nets
// (restored by amct_retrain: this fork silently ignored -weights).
void CopyLayers(caffe::Solver<float>* solver, const std::string& model_list) {
  std::vector<std::string> model_names;
  boost::split(model_names, model_list, boost::is_any_of(","));
  for (int i = 0; i < model_names.size(); ++i) {
    LOG(INFO) << "Finetuning from " << model_names[i];
    solver->net()->CopyTrainedLayersFrom(model_names[i]);
    for (int j = 0; j < solver->test_nets().size(); ++j) {
      solver->test_nets()[j]->CopyTrainedLayersFrom(model_names[i]);
    }
  }
}

// Train / Finetune a model.
int train() {'''
RESTORE_OLD = '''    solver->Restore(FLAGS_snapshot.c_str());
  }
'''
RESTORE_NEW = '''    solver->Restore(FLAGS_snapshot.c_str());
  } else if (FLAGS_weights.size()) {
    CopyLayers(solver.get(), FLAGS_weights);
  }
'''

# Deploy-model fields of the original toolkit's schema (contract section 3), same numbers.
BLOB_FIELDS_ANCHOR = "  optional int32 width = 4 [default = 0];\n}\n"
BLOB_FIELDS = '''  optional int32 width = 4 [default = 0];

  // amct_retrain deploy fields: int8 weights, int32 bias, packed uint64 deq_scale.
  optional bytes int8_data = 10;
  repeated int32 int32_data = 11 [packed = true];
  repeated uint64 uint64_data = 12 [packed = true];
}
'''
LAYER_FIELDS_ANCHOR = "  optional WindowDataParameter window_data_param = 129;\n"
LAYER_FIELDS = LAYER_FIELDS_ANCHOR + '''  // amct_retrain deploy fields (numbers of the original toolkit's schema).
  optional QuantParameter quant_param = 208;
  optional DequantParameter dequant_param = 200000;
'''
NEW_MESSAGES = '''
// amct_retrain deploy layers. Quant: q = round(x * scale) + offset, offset one int8 byte.
message QuantParameter {
  optional float scale = 2;
  optional bytes offset = 3;
}

// DeQuant: the per-channel deq_scale lives packed in the layer's blob 0 (uint64_data).
message DequantParameter {
}
'''


def patch(path: pathlib.Path, old: str, new: str, done_marker: str, count: int = -1) -> None:
    text = path.read_text()
    if done_marker in text:
        return
    if old not in text:
        sys.exit(f"patch_caffe: {path}: expected text not found: {old[:60]!r}")
    path.write_text(text.replace(old, new, count))


def main(src: pathlib.Path) -> None:
    io_cpp = src / "src/caffe/util/io.cpp"
    patch(io_cpp, PROTO_LIMIT_OLD, PROTO_LIMIT_NEW, PROTO_LIMIT_NEW)
    if PROTO_LIMIT_OLD in io_cpp.read_text():
        sys.exit(f"patch_caffe: {io_cpp}: 512 MB limit still present")

    caffe_cpp = src / "tools/caffe.cpp"
    patch(caffe_cpp, "\n// Train / Finetune a model.\nint train() {", COPY_LAYERS_FN,
          "void CopyLayers(", 1)
    patch(caffe_cpp, RESTORE_OLD, RESTORE_NEW, "CopyLayers(solver.get(), FLAGS_weights)", 1)

    proto = src / "src/caffe/proto/caffe.proto"
    patch(proto, BLOB_FIELDS_ANCHOR, BLOB_FIELDS, "int8_data = 10", 1)
    patch(proto, LAYER_FIELDS_ANCHOR, LAYER_FIELDS, "quant_param = 208", 1)
    text = proto.read_text()
    if "message QuantParameter" not in text:
        proto.write_text(text + NEW_MESSAGES)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
