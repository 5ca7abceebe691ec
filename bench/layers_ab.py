"""The digits LeNet's QAT iteration with this tree's quant layers against another revision's,
paired in one process: float, QAT with REV's layers, QAT with ours, interleaved round by round.

Runs of bench/qat_overhead.py at different moments differ by about +-0.04 on this shared VM,
more than most single changes to the layers; timing both layer versions in the same rounds
of one process tells them apart. REV's ``amct_retrain`` and ``layers`` are extracted (``git
archive``) into a temporary directory under other names and load the retrain model that this
tree writes, so REV must share its layout (layer types, param_str keys, blobs).

    .venv/bin/python bench/layers_ab.py REV [--rounds 40] [--iters 80]
"""
import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.qat_overhead import digits_net, ms_per_iter, ours, solver_for  # noqa: E402

REV_PACKAGE, REV_LAYERS = "amct_rev", "amct_rev_layers"


def extract_revision(rev: str, into: pathlib.Path) -> None:
    """REV's amct_retrain and layers as packages ``amct_rev`` and ``amct_rev_layers`` in ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "amct_retrain", "layers"],
                             stdout=subprocess.PIPE, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "amct_retrain").rename(into / REV_PACKAGE)
    (into / "layers").rename(into / REV_LAYERS)
    for source in into.rglob("*.py"):
        text = source.read_text()
        source.write_text(text.replace("amct_retrain_layers", REV_LAYERS).replace("amct_retrain", REV_PACKAGE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision whose layers to compare with (e.g. HEAD~1)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds (default %(default)s)")
    parser.add_argument("--iters", type=int, default=80, help="iterations per timed run (default %(default)s)")
    args = parser.parse_args()
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        extract_revision(args.rev, out)
        sys.path.insert(0, str(out))
        float_solver, ours_solver = ours("digits", digits_net(out), out)
        rev_model = out / "digits_rev_qat.prototxt"
        rev_model.write_text((out / "digits_qat.prototxt").read_text().replace("amct_retrain_layers.",
                                                                               f"{REV_LAYERS}."))
        rev_solver = solver_for(rev_model, out / "digits_qat.caffemodel")
        rounds = [[ms_per_iter(s, args.iters) for s in (float_solver, rev_solver, ours_solver)]
                  for _ in range(args.rounds)]
    median = statistics.median
    print(f"digits LeNet, batch 64: {args.rounds} rounds of {args.iters} iterations, load average "
          f"{os.getloadavg()[0]:.1f}; medians")
    print(f"  ms per iteration: float {median(r[0] for r in rounds):.3f}, QAT with {args.rev}'s layers "
          f"{median(r[1] for r in rounds):.3f}, with this tree's {median(r[2] for r in rounds):.3f}")
    print(f"  QAT/float: {args.rev} {median(r[1] / r[0] for r in rounds):.4f}, this tree "
          f"{median(r[2] / r[0] for r in rounds):.4f}; this tree / {args.rev}: "
          f"{median(r[2] / r[1] for r in rounds):.4f}")


if __name__ == "__main__":
    main()
