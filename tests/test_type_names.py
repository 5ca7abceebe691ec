"""One place per type: a quantizable type's name is written in at most three library modules.

The per-type table (layer_types.py) holds what the toolkit knows of each quantizable Caffe type;
besides it only the BatchNorm fusion patterns (graph/fuse.py) and the ONNX converters
(export/float_layers.py) may name one, as a string (``layer.type == "Pooling"``). Any other module
reads the table. Pure: the sources are parsed (ast), nothing is imported. Run as a script
(``python -m tests.test_type_names``) it prints where each type is named.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Read from the table's source, so that a new entry is held too without importing it (caffe_pb2).
TABLE = ROOT / "amct_retrain" / "layer_types.py"
MAY_NAME_A_TYPE = {"amct_retrain/layer_types.py", "amct_retrain/graph/fuse.py", "amct_retrain/export/float_layers.py"}


def quantizable_types() -> list[str]:
    """The keys of QUANTIZABLE_RULES, read from layer_types.py."""
    for node in ast.parse(TABLE.read_text()).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "QUANTIZABLE_RULES":
            return [key.value for key in node.value.keys]
    raise AssertionError(f"{TABLE}: no QUANTIZABLE_RULES dict")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (a docstring may mention a type: it switches on nothing)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def type_names() -> dict[str, dict[str, list[int]]]:
    """Type -> library module (path from the root) -> the lines of the strings equal to the type's name."""
    types = set(quantizable_types())
    found: dict[str, dict[str, list[int]]] = {t: {} for t in sorted(types)}
    for path in sorted([*(ROOT / "amct_retrain").rglob("*.py"), *(ROOT / "layers").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in types and id(node) not in docstrings):
                found[node.value].setdefault(str(path.relative_to(ROOT)), []).append(node.lineno)
    return found


def test_the_table_knows_the_quantizable_types():
    assert {"Convolution", "Deconvolution", "InnerProduct", "Pooling"} <= set(quantizable_types())


def test_a_quantizable_type_is_named_only_by_the_table_the_fusions_and_the_onnx_converters():
    wrong = [f"{module}:{lines[0]}: names '{layer_type}'" for layer_type, modules in type_names().items()
             for module, lines in modules.items() if module not in MAY_NAME_A_TYPE]
    assert not wrong, ("a quantizable type's name outside layer_types.py, graph/fuse.py and export/float_layers.py "
                       "(move the per-type fact into the table, QUANTIZABLE_RULES):\n" + "\n".join(wrong))


if __name__ == "__main__":
    for layer_type, modules in type_names().items():
        print(f"{layer_type}: {len(modules)} modules")
        for module, lines in modules.items():
            print(f"  {module}: lines {', '.join(map(str, sorted(lines)))}")
