"""PNG plots of an analysis (matplotlib's Agg renderer, no display, no pyplot state)."""
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Layer = Mapping[str, Any]
BAR_COLOR, CLIP_COLOR, GRID_COLOR = "#1f77b4", "#d62728", "#7f7f7f"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def sqnr_bars(layers: Sequence[Layer]) -> bytes:
    """Horizontal bars of each layer's output SQNR (dB), worst at the top; an exact output
    (infinite SQNR) is drawn past the largest finite bar and labelled "exact"."""
    finite = [layer["sqnr_db"] for layer in layers if math.isfinite(layer["sqnr_db"])]
    cap = (max(finite) if finite else 0.0) + 10.0
    values = [layer["sqnr_db"] if math.isfinite(layer["sqnr_db"]) else cap for layer in layers]
    fig = Figure(figsize=(8, 0.6 + 0.35 * len(layers)))
    ax = fig.add_subplot()
    y = np.arange(len(layers))
    ax.barh(y, values, color=BAR_COLOR)
    ax.set_yticks(y, [layer["name"] for layer in layers])
    ax.invert_yaxis()
    for yi, layer, v in zip(y, layers, values):
        if not math.isfinite(layer["sqnr_db"]):
            ax.text(v, yi, " exact", va="center")
    ax.set_xlabel("output SQNR against float (dB)")
    return _png(fig)


def activation_histogram(layer: Layer) -> bytes:
    """The layer's input histogram (fake-quant model) with the int8 grid's ends as clip lines."""
    act = layer["activation"]
    edges, counts = np.asarray(act["histogram"]["edges"]), np.asarray(act["histogram"]["counts"])
    fig = Figure(figsize=(6, 2.6))
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=BAR_COLOR)
    for x, label in ((act["clip_min"], "clip min"), (act["clip_max"], "clip max")):
        ax.axvline(x, color=CLIP_COLOR, linestyle="--", label=label)
    if counts.any():
        ax.set_yscale("log")
    ax.set_xlabel(f"{layer['name']}: input ({act['clipped_below']:.2%} below, {act['clipped_above']:.2%} above)")
    ax.set_ylabel("count")
    return _png(fig)


def weight_ranges(layer: Layer) -> bytes:
    """Each output channel's weight range (bars from min to max) against its int8 grid
    ``[-128, 127] * scale_w`` (grey steps)."""
    w = layer["weights"]
    c = np.arange(len(w["min"]))
    fig = Figure(figsize=(7.5, 2.6))
    ax = fig.add_subplot()
    ax.bar(c, np.subtract(w["max"], w["min"]), bottom=w["min"], color=BAR_COLOR, width=0.8, label="weights")
    ax.step(c, w["grid_max"], where="mid", color=GRID_COLOR, label="127 * scale_w")
    ax.step(c, w["grid_min"], where="mid", color=GRID_COLOR, linestyle=":", label="-128 * scale_w")
    ax.set_xlabel(f"{layer['name']}: output channel")
    ax.set_ylabel("weight")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)
