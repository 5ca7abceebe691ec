"""The outputs of an analysis: ``analysis.json``, a self-contained ``report.html`` and a console table."""
import base64
import html
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from amct_retrain.analysis import plots
from amct_retrain.fileio import staged_outputs

LOG = logging.getLogger(__name__)
ANALYSIS_JSON, REPORT_HTML = "analysis.json", "report.html"
STYLE = """body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td.name { text-align: left; font-family: monospace; }
section { margin-top: 1.5em; } img { display: block; margin: 0.5em 0; }"""


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no infinity): an SQNR of null means
    an exact output."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "exact" if value > 0 else "-inf"
    return format(value, spec)


def table_rows(layers: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The console / HTML table: header row, then one row per layer in the given (ranked) order."""
    rows = [["rank", "layer", "type", "bits", "cosine", "SQNR dB", "max diff (steps)", "clipped low", "clipped high",
             "shift-N"]]
    for rank, layer in enumerate(layers, 1):
        act, shift = layer["activation"], layer["shift_bit"]
        rows.append([str(rank), layer["name"], layer["type"], str(layer["bit_width"]), _fmt(layer["cosine"], ".6f"),
                     _fmt(layer["sqnr_db"], ".2f"), _fmt(layer["max_diff_output_steps"], ".2f"),
                     f"{act['clipped_below']:.3%}", f"{act['clipped_above']:.3%}",
                     f"{min(shift)}-{max(shift)}" if min(shift) != max(shift) else str(shift[0])])
    return rows


def console_table(layers: Sequence[Mapping[str, Any]]) -> str:
    """The ranked layers as a fixed-width text table."""
    rows = table_rows(layers)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def _layer_section(layer: Mapping[str, Any]) -> str:
    name = html.escape(layer["name"])
    act = layer["activation"]
    parts = [f'<section class="layer-detail" id="layer-{name}"><h3>{name} ({html.escape(layer["type"])}, '
             f'{layer["bit_width"]} bits)</h3>',
             f"<p>input range [{act['min']:.6g}, {act['max']:.6g}] against the clips "
             f"[{act['clip_min']:.6g}, {act['clip_max']:.6g}] (scale_d {act['scale_d']:.6g}, offset_d "
             f"{act['offset_d']}); shift-N per channel: {html.escape(' '.join(map(str, layer['shift_bit'])))}</p>",
             _img(plots.activation_histogram(layer), f"{layer['name']} input histogram")]
    if layer["weights"] is not None:
        parts.append(_img(plots.weight_ranges(layer), f"{layer['name']} weight ranges"))
    parts.append("</section>")
    return "\n".join(parts)


def report_html(analysis: Mapping[str, Any]) -> str:
    """A self-contained page (no external resource): the SQNR bars, the ranked table (one
    ``tr.layer`` row per quantized layer) and each layer's histogram and weight ranges."""
    layers = analysis["layers"]
    header, *rows = table_rows(layers)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join('<tr class="layer">' + "".join(
        f'<td class="name"><a href="#layer-{html.escape(c)}">{html.escape(c)}</a></td>' if i == 1
        else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    models = "".join(f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in analysis["models"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>amct_retrain: per-layer quantization analysis</title>
<style>{STYLE}</style></head>
<body>
<h1>Per-layer quantization analysis</h1>
<p>{len(layers)} quantized layers, {analysis['iterations']} TEST batches; each layer's output in the fake-quant
model against the float model on the same batches (errors of earlier layers included), worst first.</p>
<ul>{models}</ul>
{_img(plots.sqnr_bars(layers), "per-layer SQNR")}
<table id="layers"><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
{"".join(_layer_section(layer) for layer in layers)}
</body></html>
"""


def output_files(output_dir: str) -> dict[str, str]:
    """The paths :func:`write_outputs` writes in ``output_dir``: ``json`` and ``html``."""
    return {"json": os.path.join(output_dir, ANALYSIS_JSON), "html": os.path.join(output_dir, REPORT_HTML)}


def write_outputs(analysis: Mapping[str, Any], output_dir: str) -> dict[str, str]:
    """Write ``analysis.json`` and ``report.html`` into ``output_dir`` (both or neither) and log
    the console table; returns the two paths."""
    os.makedirs(output_dir, exist_ok=True)
    files = output_files(output_dir)
    page = report_html(analysis)
    with staged_outputs() as out:
        out.write(files["json"], json.dumps(_json_safe(analysis), indent=1, allow_nan=False))
        out.write(files["html"], page)
    LOG.info("per-layer analysis, worst first:\n%s", console_table(analysis["layers"]))
    LOG.info("analysis written to %s and %s", files["json"], files["html"])
    return files
