"""Idempotent source patches applied to the pinned Caffe sdist before it is built.

Each patch checks whether it is already applied, so running this twice is harmless.
Usage: python patch_caffe.py CAFFE_SOURCE_DIR [all|build-only]
  all         the project's Caffe: build fixes, behaviour fixes and the deploy schema
  build-only  only what today's compilers need to build it (a stand-in for a user's own Caffe)
"""
import pathlib
import re
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

# Two nets reading one LMDB in a process (a TEST net beside its TRAIN net, a float and a
# quantized net) shared one reading thread keyed by layer name + source: it served only the
# first net, so the second hung, or the thread aborted (new_queue_pairs_.size() == 0).
# Each reader now gets its own body (thread, cursor, reading from the first record); only the
# solvers of one multi-GPU training still share one, as upstream meant.
READER_SHARED_OLD = """  // Get or create a body
  boost::mutex::scoped_lock lock(bodies_mutex_);
  string key = source_key(param);
  weak_ptr<Body>& weak = bodies_[key];
  body_ = weak.lock();
  if (!body_) {
    body_.reset(new Body(param));
    bodies_[key] = weak_ptr<Body>(body_);
  }
  body_->new_queue_pairs_.push(queue_pair_);
"""
READER_SHARED_NEW = """  // amct_retrain: one body (reading thread and cursor) per reader, so that every net on
  // a source reads it from its first record, in order, on its own. Only the solvers of
  // one multi-GPU training share a body, which deals them records in turn.
  if (param.phase() == TRAIN && Caffe::solver_count() > 1) {
    boost::mutex::scoped_lock lock(bodies_mutex_);
    string key = source_key(param);
    weak_ptr<Body>& weak = bodies_[key];
    body_ = weak.lock();
    if (!body_) {
      body_.reset(new Body(param));
      bodies_[key] = weak_ptr<Body>(body_);
    }
  } else {
    body_.reset(new Body(param));
  }
  body_->new_queue_pairs_.push(queue_pair_);
"""

# LMDB forbids opening one environment twice in a process (closing either copy drops the
# process's locks on the lock file), which separate readers of one LMDB would do. Read-only
# opens of one database share one counted environment; each reader keeps its own read-only
# transaction and cursor (the environment is opened MDB_NOTLS, so threads may hold several).
LMDB_OPEN_OLD = """void LMDB::Open(const string& source, Mode mode) {
  MDB_CHECK(mdb_env_create(&mdb_env_));"""
LMDB_OPEN_NEW = """namespace {
// amct_retrain: the read-only environments open in this process, by real path.
struct SharedEnv {
  MDB_env* env;
  int users;
};
boost::mutex shared_envs_mutex;
std::map<string, SharedEnv> shared_envs;

string RealPath(const string& source) {
  char* resolved = realpath(source.c_str(), NULL);
  if (resolved == NULL) return source;
  string path(resolved);
  free(resolved);
  return path;
}
}  // namespace

void LMDB::Open(const string& source, Mode mode) {
  if (mode != READ) {
    OpenEnv(source, mode);
    return;
  }
  boost::mutex::scoped_lock lock(shared_envs_mutex);
  shared_key_ = RealPath(source);
  std::map<string, SharedEnv>::iterator it = shared_envs.find(shared_key_);
  if (it != shared_envs.end()) {
    mdb_env_ = it->second.env;
    ++it->second.users;
    LOG(INFO) << "Opened lmdb " << source << " (environment shared with "
              << it->second.users - 1 << " other reader(s))";
    return;
  }
  OpenEnv(source, mode);
  SharedEnv shared = {mdb_env_, 1};
  shared_envs[shared_key_] = shared;
}

void LMDB::Close() {
  if (mdb_env_ == NULL) return;
  if (!shared_key_.empty()) {
    // Only the main database is used: its handle is the constant MAIN_DBI, which needs no
    // closing, and the environment closes with its last reader (after its cursors).
    boost::mutex::scoped_lock lock(shared_envs_mutex);
    std::map<string, SharedEnv>::iterator it = shared_envs.find(shared_key_);
    if (it != shared_envs.end() && --it->second.users == 0) {
      mdb_env_close(mdb_env_);
      shared_envs.erase(it);
    }
    shared_key_.clear();
  } else {
    mdb_dbi_close(mdb_env_, mdb_dbi_);
    mdb_env_close(mdb_env_);
  }
  mdb_env_ = NULL;
}

void LMDB::OpenEnv(const string& source, Mode mode) {
  MDB_CHECK(mdb_env_create(&mdb_env_));"""
LMDB_INCLUDES_OLD = "#include <sys/stat.h>\n"
LMDB_INCLUDES_NEW = """#include <sys/stat.h>

#include <boost/thread/mutex.hpp>
#include <cstdlib>
#include <map>
"""
LMDB_CLOSE_OLD = """  virtual void Close() {
    if (mdb_env_ != NULL) {
      mdb_dbi_close(mdb_env_, mdb_dbi_);
      mdb_env_close(mdb_env_);
      mdb_env_ = NULL;
    }
  }"""
LMDB_CLOSE_NEW = "  virtual void Close();  // amct_retrain: releases a shared environment"
LMDB_MEMBERS_OLD = """ private:
  MDB_env* mdb_env_;
  MDB_dbi mdb_dbi_;
};"""
LMDB_MEMBERS_NEW = """ private:
  void OpenEnv(const string& source, Mode mode);

  MDB_env* mdb_env_;
  MDB_dbi mdb_dbi_;
  string shared_key_;  // amct_retrain: real path of a shared read-only environment
};"""

# pycaffe's Datum helpers call ndarray.tostring / np.fromstring, which numpy 2 removed.
PYCAFFE_IO = [("datum.data = arr.tostring()", "datum.data = arr.tobytes()"),
              ("return np.fromstring(datum.data, dtype=np.uint8).reshape(",
               "return np.frombuffer(datum.data, dtype=np.uint8).copy().reshape(")]

# gcc 14's libstdc++ no longer includes <cfloat> through other headers (sampler.cpp,
# bbox_util.cpp: FLT_MAX / FLT_MIN undeclared): every source using the limits includes it.
FLOAT_LIMITS = re.compile(r"\b(FLT|DBL)_(MAX|MIN|EPSILON)\b")
CFLOAT_INCLUDE = "#include <cfloat>  // amct_retrain: gcc 14 no longer includes it indirectly\n"


def patch(path: pathlib.Path, old: str, new: str, done_marker: str, count: int = -1) -> None:
    text = path.read_text()
    if done_marker in text:
        return
    if old not in text:
        sys.exit(f"patch_caffe: {path}: expected text not found: {old[:60]!r}")
    path.write_text(text.replace(old, new, count))


def main(src: pathlib.Path, patches: str) -> None:
    if patches not in ("all", "build-only"):
        sys.exit(f"patch_caffe: unknown patch set {patches!r} (all, build-only)")
    include_float_limits(src)
    if patches == "all":
        fix_behaviour(src)


def fix_behaviour(src: pathlib.Path) -> None:
    """The project's fixes of what the pinned Caffe does, and the deploy schema."""
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

    patch(src / "src/caffe/data_reader.cpp", READER_SHARED_OLD, READER_SHARED_NEW,
          "one body (reading thread and cursor) per reader", 1)
    db_lmdb_cpp = src / "src/caffe/util/db_lmdb.cpp"
    patch(db_lmdb_cpp, LMDB_INCLUDES_OLD, LMDB_INCLUDES_NEW, "#include <boost/thread/mutex.hpp>", 1)
    patch(db_lmdb_cpp, LMDB_OPEN_OLD, LMDB_OPEN_NEW, "void LMDB::OpenEnv(", 1)
    db_lmdb_hpp = src / "include/caffe/util/db_lmdb.hpp"
    patch(db_lmdb_hpp, LMDB_CLOSE_OLD, LMDB_CLOSE_NEW, LMDB_CLOSE_NEW, 1)
    patch(db_lmdb_hpp, LMDB_MEMBERS_OLD, LMDB_MEMBERS_NEW, "string shared_key_;", 1)

    pycaffe_io = src / "python/caffe/io.py"
    for old, new in PYCAFFE_IO:
        patch(pycaffe_io, old, new, new, 1)


def include_float_limits(src: pathlib.Path) -> None:
    """Adds <cfloat> to every C++ source that uses FLT_/DBL_ limits without including it."""
    for folder in ("include", "src", "tools", "python"):
        for path in sorted((src / folder).rglob("*")):
            if path.suffix not in (".cpp", ".hpp", ".cu", ".cuh", ".h"):
                continue
            text = path.read_text(errors="surrogateescape")
            if not FLOAT_LIMITS.search(text) or "<cfloat>" in text or "<float.h>" in text:
                continue
            first = text.find("#include")
            if first < 0:
                sys.exit(f"patch_caffe: {path}: uses FLT_/DBL_ limits but has no #include to add <cfloat> to")
            path.write_text(text[:first] + CFLOAT_INCLUDE + text[first:], errors="surrogateescape")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "all")
