"""Imports run one way: every import in the library follows the rows of docs/architecture.md.

Pure: the modules' sources are parsed (ast), nothing is imported. Run as a script
(``python -m tests.test_import_layering``) it prints every import edge against the rows.
"""
import ast
import pathlib
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE, LAYERS_PACKAGE = "amct_retrain", "amct_retrain_layers"  # layers/ installs as amct_retrain_layers

# The rows of docs/architecture.md, bottom up (row 1 first): a module imports only from lower rows,
# from its own row where the row is in PEERS, or, within API_ROW, another module's public API
# (amct_retrain.__all__).
ROWS: list[tuple[str, ...]] = [
    ("errors", "caffe_build"),
    ("fileio",),
    ("numerics.checks",),  # the numerics package, its modules bottom up
    ("numerics.activation", "numerics.arq"),
    ("numerics.ifmr", "numerics.integer"),
    ("numerics", "feeding", "caffe_proto"),
    ("kernels",),
    ("record", "tensorboard", "analysis.metrics", "analysis.plots"),
    ("analysis.report",),
    ("layer_specs", "graph.caffe_params", "graph.netgraph"),
    ("layer_types",),
    ("graph.model_io",),
    ("saved_models", "graph.quant_layers"),
    ("graph", "graph.fuse", "graph.insert", "graph.strip", "graph.calibrate", "graph.saved_nets"),
    ("config.common",),  # the config package, each module on the ones before it
    ("config.simplified",),
    ("config.schema",),
    ("config.resolve",),
    ("config",),
    ("saver",),
    ("export.graph",),  # the ONNX exporter's modules, each on the ones before it
    ("export.float_layers",),
    ("export.quantized",),
    ("export.standard",),
    ("retrain", "calibration", "auto_calibration", "reference", "solver", "runtime", "export.onnx",
     "analysis.runner", "analysis"),
    ("mixed_precision",),  # calibration trials scored by auto_calibration's sensitivity classes
    ("export", ""),  # "": amct_retrain/__init__.py, the public API
    ("cli",),
]
PEERS = {"graph"}  # graph passes compose: a pass may call another
API_ROW = "retrain"  # (the row of) the API modules: they may use one another's public API only
# The Python layers run inside Caffe: numerics and the small pure modules, never the graph or the API.
LAYERS_MAY_IMPORT = {"errors", "fileio", "numerics", "kernels", "feeding", "record", "tensorboard", "layer_specs",
                     "layer_types", "saved_models"}


def _name(module: str) -> str:
    return f"{PACKAGE}.{module}" if module else PACKAGE


ROW_OF = {_name(m): i for i, row in enumerate(ROWS) for m in row}
PEER_ROWS = {ROW_OF[_name(m)] for m in PEERS}


def library_modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for amct_retrain/ and layers/."""
    modules = {}
    for top, name in ((ROOT / PACKAGE, PACKAGE), (ROOT / "layers", LAYERS_PACKAGE)):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def public_api() -> set[str]:
    """The names in amct_retrain.__all__, read from the source."""
    tree = ast.parse((ROOT / PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("amct_retrain/__init__.py has no __all__")


def imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> Iterator[tuple[str, set[str], int]]:
    """(imported library module, names taken from it, first line) for every module ``path`` imports, at any
    depth (a function's lazy import counts). A module imported whole (``from amct_retrain import
    calibration``) yields the attributes the file reads from it."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}  # local name -> library module imported whole
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else alias.name.split(".")[0]
                    found.append((alias.name, set(), node.lineno, local))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in modules:
                    bound[alias.asname or alias.name] = sub
                    found.append((sub, set(), node.lineno, alias.asname or alias.name))
                else:
                    found.append((node.module, {alias.name}, node.lineno, None))
    attributes: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            attributes.setdefault(node.value.id, set()).add(node.attr)
    edges: dict[str, tuple[set[str], int]] = {}  # one edge per imported module: all names, first line
    for module, names, line, local in found:
        taken, first = edges.setdefault(module, (set(), line))
        taken |= names | attributes.get(local, set()) if local else names
    for module, (names, line) in edges.items():
        yield module, names, line


def violations() -> list[str]:
    """Every import against the rows, as 'file:line: importer -> imported: why'."""
    modules, api = library_modules(), public_api()
    out = []
    for importer, path in modules.items():
        where = path.relative_to(ROOT)
        for imported, names, line in imports(path, modules):
            if imported == importer or imported.startswith(f"{importer}."):
                continue  # a package's own modules
            edge = f"{where}:{line}: {importer} -> {imported}"
            if importer.startswith(LAYERS_PACKAGE):
                if imported.startswith(LAYERS_PACKAGE) or imported.removeprefix(f"{PACKAGE}.") in LAYERS_MAY_IMPORT:
                    continue
                out.append(f"{edge}: a Caffe layer imports only {sorted(LAYERS_MAY_IMPORT)}")
                continue
            if imported.startswith(LAYERS_PACKAGE):
                out.append(f"{edge}: the library does not import the Caffe layers")
                continue
            for module in (importer, imported):
                assert module in ROW_OF, f"{module} has no row in {__file__}: declare where it sits (ROWS)"
            low, high = ROW_OF[imported], ROW_OF[importer]
            if low < high or (low == high and low in PEER_ROWS):
                continue
            if low == high == ROW_OF[_name(API_ROW)] and names and names <= api:
                continue  # one API module calling another's public API
            private = sorted(names - api) if low == high == ROW_OF[_name(API_ROW)] else []
            out.append(f"{edge}: row {high + 1} imports from row {low + 1}"
                       + (f" (not public API: {', '.join(private)})" if private else ""))
    return out


def test_every_module_has_a_row():
    undeclared = sorted(m for m in library_modules() if m.startswith(f"{PACKAGE}.") and m not in ROW_OF)
    assert not undeclared, f"modules with no row in ROWS (declare where they sit): {undeclared}"
    gone = sorted(m for m in ROW_OF if m not in library_modules())
    assert not gone, f"ROWS names modules that do not exist: {gone}"


def test_imports_follow_the_rows():
    against = violations()
    assert not against, "imports against the rows of docs/architecture.md:\n" + "\n".join(against)


def test_the_checker_sees_an_import_against_the_rows(tmp_path):
    """The parser finds the forms the library uses: whole modules (their attributes), names, lazy."""
    source = tmp_path / "probe.py"
    source.write_text("from amct_retrain import calibration, numerics\n"
                      "from amct_retrain.saver import output_files\n"
                      "def f():\n    import amct_retrain.reference as ref\n"
                      "    return calibration.activation_factors, ref.QUANTIZED_TYPES\n")
    found = {(module, frozenset(names)) for module, names, _ in imports(source, library_modules())}
    assert found == {("amct_retrain.calibration", frozenset({"activation_factors"})),
                     ("amct_retrain.numerics", frozenset()),
                     ("amct_retrain.saver", frozenset({"output_files"})),
                     ("amct_retrain.reference", frozenset({"QUANTIZED_TYPES"}))}, found


if __name__ == "__main__":
    edges = violations()
    print("\n".join(edges))
    print(f"{len(edges)} import edges against the rows")
