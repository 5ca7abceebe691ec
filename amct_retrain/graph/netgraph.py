"""The net as a graph: which layers Caffe builds in a phase, the versions of its blobs (who wrote,
who reads), and a net rebuilt from new layers. Every graph pass, the saver, the reference executor
and the exporters ask these questions here, so each has one answer.

Phase rules are Caffe's (``Net::FilterNet`` and ``Net::StateMeetsRule``): a layer with ``include``
rules is built when one of them holds, else when none of its ``exclude`` rules holds; a rule holds
when its phase (if set) is the net's, the net's level lies within ``min_level`` .. ``max_level``
(if set), the net has every ``stage`` and no ``not_stage``. The level and stages are known for a
net built from its file alone (``caffe.Net(file, caffe.TEST)``: the file's ``state``), unknown for
one a solver builds (its ``train_state`` / ``test_state`` may add some): then a rule that tests
them may hold or not, and the answer is whether the layer *may* be built.

Caffe reuses blob names for in-place layers (ReLU, DeQuant), so a bottom is read as a *version*:
the blob written by one particular layer. The layers of every phase count together (a TRAIN and a
TEST data layer both writing ``data`` make two versions), which is what the passes need: a reader
in any phase keeps a blob alive.
"""
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import NamedTuple

from amct_retrain.caffe_proto import caffe_pb2

__all__ = ["rule_holds", "runs_in_phase", "phase_layers", "uses_stages_or_levels", "phase_key",
           "with_phase_rules_of", "NET_INPUT", "NOT_WRITTEN", "BlobVersion", "BlobGraph", "rebuilt", "rebuilt_per_layer"]

Layer = caffe_pb2.LayerParameter


# --------------------------------------------------------------------------- phase rules


def _tests_level_or_stages(rule: caffe_pb2.NetStateRule) -> bool:
    return rule.HasField("min_level") or rule.HasField("max_level") or bool(rule.stage) or bool(rule.not_stage)


def rule_holds(rule: caffe_pb2.NetStateRule, phase: int, state: caffe_pb2.NetState | None = None) -> bool | None:
    """Whether ``rule`` holds in a net of ``phase`` (caffe_pb2.TRAIN or TEST) with ``state``'s level
    and stages (``Net::StateMeetsRule``); with ``state`` None (unknown level and stages), None for a
    rule that may hold or not because it tests them."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if not _tests_level_or_stages(rule):
        return True
    if state is None:
        return None
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    return set(rule.stage) <= set(state.stage) and not set(rule.not_stage) & set(state.stage)


def runs_in_phase(layer: Layer, phase: int, state: caffe_pb2.NetState | None = None) -> bool:
    """Whether Caffe builds ``layer`` in a net of ``phase`` (``Net::FilterNet``) with ``state``'s level
    and stages; with ``state`` None (a solver's net: unknown level and stages), whether it *may*:
    an include rule that may hold includes the layer, only an exclude rule that surely holds
    excludes it."""
    if layer.include:
        return any(rule_holds(rule, phase, state) is not False for rule in layer.include)
    return not any(rule_holds(rule, phase, state) for rule in layer.exclude)


def phase_layers(net: caffe_pb2.NetParameter, phase: int, state: caffe_pb2.NetState | None = None) -> list[Layer]:
    """The layers of ``net`` that :func:`runs_in_phase` ``phase`` (with ``state``), in net order."""
    return [layer for layer in net.layer if runs_in_phase(layer, phase, state)]


def uses_stages_or_levels(layer: Layer) -> bool:
    """Whether a phase rule of ``layer`` tests the net's level or stages."""
    return any(_tests_level_or_stages(rule) for rule in list(layer.include) + list(layer.exclude))


def phase_key(layer: Layer) -> tuple[bytes, ...]:
    """``layer``'s include and exclude rules as a hashable value: equal for layers with the same rules."""
    return tuple(r.SerializeToString() for r in layer.include) + (b"|",) + tuple(
        r.SerializeToString() for r in layer.exclude)


def with_phase_rules_of(layer: Layer, *added: Layer) -> list[Layer]:
    """``added`` (modified in place) with ``layer``'s include and exclude rules: a layer the toolkit
    inserts for ``layer`` runs in exactly its phases."""
    for a in added:
        a.include.extend(layer.include)
        a.exclude.extend(layer.exclude)
    return list(added)


# --------------------------------------------------------------------------- blob versions


NET_INPUT = -1
"""The writer of a legacy ``input:`` blob of the net."""
NOT_WRITTEN = -2
"""The writer of a bottom no earlier layer writes and the net does not input (Caffe refuses the net)."""


class BlobVersion(NamedTuple):
    """One write of a blob: ``writer`` is the index of the layer that wrote ``blob``, or
    :data:`NET_INPUT` or :data:`NOT_WRITTEN`."""
    blob: str
    writer: int


class BlobGraph:
    """The blob versions of a net, the layers of all phases together.

    ``reads[i]``: the version each bottom of layer ``i`` reads (the latest write of that name by an
    earlier layer); ``readers[v]``: the indices of the layers reading version ``v``, in net order,
    a layer once per bottom that reads it.
    """

    def __init__(self, net: caffe_pb2.NetParameter) -> None:
        current = {name: BlobVersion(name, NET_INPUT) for name in net.input}
        self.reads: list[list[BlobVersion]] = []
        self.readers: dict[BlobVersion, list[int]] = defaultdict(list)
        for i, layer in enumerate(net.layer):
            reads = [current.get(bottom, BlobVersion(bottom, NOT_WRITTEN)) for bottom in layer.bottom]
            for version in reads:
                self.readers[version].append(i)
            self.reads.append(reads)
            for top in layer.top:
                current[top] = BlobVersion(top, i)

    def sole_reader(self, version: BlobVersion) -> int | None:
        """The one layer reading ``version`` (once), or None if none or several do."""
        readers = self.readers.get(version, [])
        return readers[0] if len(readers) == 1 else None

    def first_reader(self, version: BlobVersion) -> int:
        """The first layer reading ``version`` (one that reads it exists)."""
        return self.readers[version][0]


# --------------------------------------------------------------------------- rebuilding


def rebuilt(net: caffe_pb2.NetParameter, layers: Iterable[Layer]) -> caffe_pb2.NetParameter:
    """A new net: ``net``'s fields but its layers, then ``layers`` (copied) in order. A graph pass
    yields the layers of its output; ``net`` is not modified."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    out.layer.extend(layers)
    return out


def rebuilt_per_layer(net: caffe_pb2.NetParameter,
                      replace: Callable[[int, Layer], Iterable[Layer]]) -> caffe_pb2.NetParameter:
    """:func:`rebuilt` from ``replace(index, layer)`` of every layer: the layers that stand for it
    (``[layer]`` keeps it, ``[]`` drops it)."""
    return rebuilt(net, (new for i, layer in enumerate(net.layer) for new in replace(i, layer)))
