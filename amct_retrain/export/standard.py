"""The standard QDQ export (``export_onnx(..., mode="standard")``): the QuantizeLinear /
DequantizeLinear pattern onnxruntime fuses into QLinearConv / QLinearMatMul / QGemm /
QLinearAdd / QLinearConcat (and TensorRT and OpenVINO into their int8 kernels), for speed.

Each ``Quant -> layer -> DeQuant`` triple becomes::

    x -> QuantizeLinear(scale_d, offset_d + 128: uint8) -> DequantizeLinear --+
    int8 weights -> DequantizeLinear(scale_w[c], 0, axis 0 or 1) ------------+-> Conv / ConvTranspose / Gemm -> y
    int32 bias ---> DequantizeLinear(deq[c]) --------------------------------+

uint8 activations: onnxruntime's x86 kernels are fastest with uint8 activations and int8
weights, and the record's asymmetric int8 offset maps exactly onto a uint8 zero point (q + 128,
zero point offset_d + 128; a ReLU output's -128 becomes 0). On CPUs without VNNI (AVX2) those
u8 x s8 kernels add pairs of products in saturating int16 (VPMADDUBSW): two neighbouring large
codes times two large weights of one sign overflow. Dense large codes are what images give
(on the digits demo, u8 x s8 everywhere changed 1.8 % of the top-1 answers, every one from the
first layer), and any signed input (zero point above 0: its codes cluster around it); behind a
ReLU (zero point 0) large codes are rarer. So a layer that quantizes a graph input or a signed
tensor stores its weights as uint8 (int8 + 128, zero point 128: the same values), which
onnxruntime runs with exact u8 x u8 kernels (ResNet-50's 7x7 stem: 3.3 instead of 2.75 ms CPU
time at batch 1, about 1 % of the net); a layer behind a ReLU keeps int8 weights (the digits
demo: top-1 agreement 1.0 either way, largest deviation 0.44 instead of 0.34 steps of the 8-bit
grid; ResNet-50 took 1.5x the time with uint8 weights everywhere). Where a ReLU's codes are
dense at the clipping value, the overflow remains: the test nets' concat and MLP move 0.9 %
and 0.2 % of their last layer's outputs by more than a step of its int16 grid. The shift-N requantisation to int16 is folded
into the next quantizer: ``y`` goes (through ReLU, pooling, ...) straight into the next layer's
QuantizeLinear, which onnxruntime fuses into the convolution, where the deploy model rounds
``y`` to its int16 grid first. The passes of :meth:`Standard.finish` then place quantizers so
that the integer kernels apply:

* a QuantizeLinear after MaxPool, Reshape, Flatten, Identity, Concat (or a ReLU whose zero
  point is not the minimum) is copied onto their inputs: these commute with a quantizer
  exactly, so the values do not change, and the operator then runs on uint8 (Concat as
  QLinearConcat). A MaxPool that quantizers of different scales read (ResNet's stem) gets
  the one of the largest scale, so that the convolution before it runs on integers; the
  other readers requantize its output;
* an Eltwise SUM (Add) of quantized layers' outputs gets 8-bit inputs (zero point 128:
  signed; the grid: :meth:`_Rewriter.quantize_add`), and its output (after a ReLU) the
  quantizer of its consumers (the one of largest scale where they differ): onnxruntime runs
  QLinearAdd. A tensor that an Add and a quantized layer both read is then on the layer's
  grid for the Add too: the one place, besides the folded int16 rounding, where this
  export's values move from the deploy model's (the tests hold it within a step);
* equal quantizers of one tensor (each quantized layer has its own Quant: ResNet's first
  MaxPool feeds two) become one, since onnxruntime runs an operator on integers only where a
  single quantizer reads its output.

Everything else stays float, as in the exact export; a quantized convolution that onnxruntime
cannot fuse (no quantizer reads its output) reads its weights and bias as float constants, the
values its DequantizeLinear would compute on every run.
"""
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from amct_retrain import numerics
from amct_retrain.caffe_proto import caffe_pb2
from amct_retrain.export import float_layers as fl
from amct_retrain.export.graph import Graph, QuantizedLayer
from amct_retrain.export.quantized import quantized_params, recover_scales
from amct_retrain.layer_types import QUANTIZABLE_RULES

#: uint8 = int8 code + 128: the record's offset_d as a uint8 zero point.
UINT8_SHIFT = 128
#: The int16 output grid shifted right by this many bits: an 8-bit grid for an Add's inputs.
INT16_TO_8_BITS = 8
#: Operators that commute with a quantizer (on every input, Concat): its copy goes before them.
COMMUTING = frozenset({"MaxPool", "Reshape", "Flatten", "Identity", "Concat", "Relu"})


def _per_channel_or_scalar(values: np.ndarray) -> np.ndarray:
    """One value when all channels share it (a per-tensor scale), else the vector."""
    return values[:1].reshape(()) if np.all(values == values[0]) else values


class Standard:
    """The standard form's converter of quantized layers (``convert``) and its graph passes
    (``finish``), for one export."""

    def __init__(self) -> None:
        # Output tensor of each quantized layer -> its output steps, float64 (C,) deq[c] * 2^N[c].
        self._output_steps: dict[str, np.ndarray] = {}

    def convert(self, g: Graph, q: QuantizedLayer, deploy: Mapping[str, list[caffe_pb2.BlobProto]],
                weights_file: str) -> None:
        """The QDQ form of a Quant -> layer -> DeQuant triple (see the module docstring)."""
        layer = q.layer
        rule = QUANTIZABLE_RULES[layer.type]
        ints, quant_scale, offset = quantized_params(g, q, deploy, weights_file)
        scale_d, scale_w = recover_scales(quant_scale, ints.deq)
        g.scope = q.quant.name
        # Flatten (InnerProduct) before the quantizer: DequantizeLinear feeds Gemm directly.
        x = fl.linear_input(g, layer, g.read(q.quant.bottom[0], q.quant))
        s, zp = g.const("scale", scale_d), g.const("zero_point", np.uint8(offset + UINT8_SHIFT))
        x = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, zp]), s, zp], rank=g.rank(x))

        g.scope = layer.name
        rank = fl.output_rank(g, layer, x)
        y = g.write(q.dequant.top[0], q.dequant.name, rank)
        if rule.has_weights:
            w_scale = _per_channel_or_scalar(scale_w)
            if g.is_input(g.read(q.quant.bottom[0], q.quant)) or offset + UINT8_SHIFT:
                # uint8 weights, int8 + 128 (module docstring: u8 x s8 kernels saturate on AVX2).
                stored, zero = (ints.weights.astype(np.int16) + UINT8_SHIFT).astype(np.uint8), np.uint8(UINT8_SHIFT)
            else:
                stored, zero = ints.weights, np.int8(0)
            weights = g.op("DequantizeLinear", [g.const("weights", stored), g.const("weight_scale", w_scale),
                                                g.const("weight_zero_point", np.full(w_scale.shape, zero))],
                           axis=rule.channel_axis)
            bias = None
            if len(deploy[layer.name]) > 1:
                bias = g.op("DequantizeLinear", [g.const("bias_int32", ints.bias.astype(np.int32)),
                                                 g.const("bias_scale", ints.deq),
                                                 g.const("bias_zero_point", np.zeros(ints.deq.size, np.int32))],
                            axis=0)
            fl.linear(g, layer, x, weights, bias, y)
        else:
            fl.pool_node(g, layer, x, y)
        self._output_steps[y] = numerics.output_steps(ints.deq, ints.shift_bit)

    def finish(self, g: Graph) -> None:
        """The graph passes that let onnxruntime's integer kernels apply (module docstring)."""
        _Rewriter(g, self._output_steps).run()


class _Rewriter:
    """Inserts QuantizeLinear -> DequantizeLinear pairs on edges of a finished graph."""

    def __init__(self, g: Graph, output_steps: Mapping[str, np.ndarray]) -> None:
        self.g = g
        self.output_steps = output_steps
        self.inits = {t.name: t for t in g.initializers}
        self.graph_outputs = set(g.outputs)

    # ----------------------------------------------------------------- graph queries

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.g.nodes if tensor in n.output), None)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.nodes if tensor in n.input]

    def params(self, node: onnx.NodeProto) -> tuple[float, int] | None:
        """(scale, zero point) of a per-tensor uint8 QuantizeLinear / DequantizeLinear."""
        scale, zp = (numpy_helper.to_array(self.inits[t]) for t in node.input[1:3])
        if scale.ndim or zp.dtype != np.uint8:
            return None
        return float(scale), int(zp)

    def dequantized_by(self, tensor: str) -> tuple[float, int] | None:
        node = self.producer(tensor)
        return self.params(node) if node is not None and node.op_type == "DequantizeLinear" else None

    # ----------------------------------------------------------------- edits

    def insert_pair(self, tensor: str, consumer_nodes: Sequence[onnx.NodeProto], scale: float, zp: int,
                    after: onnx.NodeProto | None) -> onnx.NodeProto:
        """Q -> DQ on ``tensor`` for ``consumer_nodes``; returns the new QuantizeLinear."""
        g = self.g
        g.scope = tensor
        s, z = g.const("q_scale", np.float32(scale)), g.const("q_zero_point", np.uint8(zp))
        self.inits.update({t.name: t for t in g.initializers[-2:]})
        start = len(g.nodes)
        quantized = g.op("QuantizeLinear", [tensor, s, z])
        dequantized = g.op("DequantizeLinear", [quantized, s, z])
        new = g.nodes[start:]
        del g.nodes[start:]
        # Right after the producer (or at the top for a graph input), keeping the order topological.
        at = g.nodes.index(after) + 1 if after is not None else 0
        g.nodes[at:at] = new
        for node in consumer_nodes:
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = dequantized
        return new[0]

    def run(self) -> None:
        for node in [n for n in self.g.nodes if n.op_type == "Add" and len(n.input) == 2]:
            self.quantize_add(node)
        work = [n for n in self.g.nodes if n.op_type == "QuantizeLinear"]
        while work:
            work.extend(self.hoist(work.pop()))
        for op_type in ("QuantizeLinear", "DequantizeLinear"):
            self.merge_twins(op_type)
        for tensor in self.output_steps:
            self.clamp_to_int16(tensor)
        # (onnxruntime fuses a Gemm without an output quantizer too, into QGemm with float output.)
        for node in [n for n in self.g.nodes if n.op_type == "Conv"]:
            if not self.fused(node):
                self.constant_weights(node)

    def merge_twins(self, op_type: str) -> None:
        """One ``op_type`` node per tensor and (scale, zero point): each quantized layer has its
        own Quant, so a tensor that two layers read (ResNet's first MaxPool) has two equal
        quantizers, and onnxruntime runs an operator on integers only where one quantizer reads
        its output (the MaxPool otherwise stays float, between a dequantizer and two quantizers)."""
        kept: dict[tuple, str] = {}
        for node in [n for n in self.g.nodes if n.op_type == op_type]:
            constants = [numpy_helper.to_array(self.inits[t]) for t in node.input[1:]]
            key = (node.input[0], *((c.dtype.str, c.shape, c.tobytes()) for c in constants),
                   *(a.SerializeToString() for a in node.attribute))
            if key not in kept or node.output[0] in self.graph_outputs:
                kept.setdefault(key, node.output[0])
                continue
            self.g.nodes.remove(node)
            for reader in self.consumers(node.output[0]):
                reader.input[:] = [kept[key] if t == node.output[0] else t for t in reader.input]
        self.drop_unused_initializers()

    def clamp_to_int16(self, tensor: str) -> None:
        """The deploy model clamps a quantized layer's output to its int16 grid's range (per
        channel); where float operators or the graph's output read it, Max and Min do. Where
        quantizers read it (directly or through a ReLU), their own 8-bit range clips instead:
        the shift-N search keeps each channel's range wide enough for what it saw."""
        end = tensor
        readers = self.consumers(end)
        if len(readers) == 1 and readers[0].op_type == "Relu":
            end = readers[0].output[0]
            readers = self.consumers(end)
        if end not in self.graph_outputs and readers and all(n.op_type == "QuantizeLinear" for n in readers):
            return
        steps = self.output_steps[tensor]
        low, high = numerics.INT16_MIN * steps, numerics.INT16_MAX * steps
        g, producer = self.g, self.producer(tensor)
        shape = (-1,) + (1,) * (g.rank(tensor) - 2)
        g.scope = tensor
        raw = g.fresh(f"{tensor}/unclamped")
        producer.output[:] = [raw if t == tensor else t for t in producer.output]
        producer.name = raw
        start = len(g.nodes)
        low_clamped = g.op("Max", [raw, g.const("int16_min", low.astype(np.float32).reshape(shape))])
        g.op("Min", [low_clamped, g.const("int16_max", high.astype(np.float32).reshape(shape))], output=tensor)
        new = g.nodes[start:]
        del g.nodes[start:]
        at = g.nodes.index(producer) + 1
        g.nodes[at:at] = new

    def fused(self, node: onnx.NodeProto) -> bool:
        """Whether onnxruntime can fuse ``node`` into an integer kernel: only quantizers read its
        output (directly or through one ReLU)."""
        readers = self.consumers(node.output[0])
        if len(readers) == 1 and readers[0].op_type == "Relu":
            readers = self.consumers(readers[0].output[0])
        return bool(readers) and all(n.op_type == "QuantizeLinear" for n in readers)

    def constant_weights(self, node: onnx.NodeProto) -> None:
        """A layer that stays float reads its weights and bias as float constants (the values its
        DequantizeLinear would compute on every run)."""
        for i, t in enumerate(list(node.input)[1:], start=1):
            dq = self.producer(t)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.inits:
                continue
            q, scale, zp = (numpy_helper.to_array(self.inits[name]) for name in dq.input)
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = scale.size
            values = (q.astype(np.int64) - zp.reshape(shape if zp.ndim else ())).astype(np.float32)
            values *= scale.reshape(shape if scale.ndim else ())
            self.g.scope = dq.output[0]
            node.input[i] = self.g.const("float", values)
            if not self.consumers(t):
                self.g.nodes.remove(dq)
        self.drop_unused_initializers()

    def drop_unused_initializers(self) -> None:
        read = {t for n in self.g.nodes for t in n.input}
        self.g.initializers[:] = [init for init in self.g.initializers if init.name in read]

    def quantize_add(self, add: onnx.NodeProto) -> None:
        """8-bit signed inputs (zero point 128) from the quantized layers' int16 grids, the
        readers' quantizer after it (and its ReLU).

        An input's grid is its layer's int16 grid shifted right by 8 bits, or, where finer,
        twice the step of the sum's quantizer: a signed grid that spans the sum's (clipped)
        range. The shift-N search keeps the smallest N that does not clamp, so small
        accumulators use a sliver of the int16 range: on the ResNet-style test net the int16
        grid alone leaves the shortcut branches 8 to 15 codes either side of zero (0.9 % of its
        logits more than an 8-bit step off, instead of 0.5 %). A sum that no quantizer reads
        (ResNet's last, before the global pooling) keeps a float output, its inputs on their
        int16 grids shifted: a grid for every sum of its inputs' grids cost more fidelity (top-1
        agreement 0.96 instead of 0.98 to 1.0 on the test net's random inputs) than its speed
        is worth; the 8-bit inputs let the convolution before it run on integers."""
        end, last = add.output[0], add
        follow = self.consumers(end)
        if len(follow) == 1 and follow[0].op_type == "Relu":
            end, last = follow[0].output[0], follow[0]
        readers = self.consumers(end)
        quantizers = [n for n in readers if n.op_type == "QuantizeLinear" and self.params(n)]
        inputs_ready = all(self.dequantized_by(t) or (t in self.output_steps and len(self.consumers(t)) == 1
                                                       and t not in self.graph_outputs) for t in add.input)
        if not inputs_ready:
            return
        sum_params = max(self.params(n) for n in quantizers) if quantizers and end not in self.graph_outputs else None
        for t in list(add.input):
            if not self.dequantized_by(t):
                scale = self.output_steps[t].max() * 2 ** INT16_TO_8_BITS
                if sum_params is not None:
                    scale = min(scale, 2 * sum_params[0])
                self.insert_pair(t, [add], scale, UINT8_SHIFT, self.producer(t))
        if sum_params is not None:
            self.insert_pair(end, readers, *sum_params, last)

    def hoist(self, quantizer: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Copies of ``quantizer`` onto the inputs of a commuting producer (module docstring).
        A MaxPool read by quantizers of different scales gets the one of the largest scale."""
        source = self.producer(quantizer.input[0])
        if self.params(quantizer) is None or source is None or source.op_type not in COMMUTING:
            return []
        readers = self.consumers(source.output[0])
        if source.output[0] in self.graph_outputs or not all(
                n.op_type == "QuantizeLinear" and self.params(n) for n in readers):
            return []
        params = max(self.params(n) for n in readers)
        if source.op_type != "MaxPool" and any(self.params(n) != params for n in readers):
            return []
        if source.op_type == "Relu" and params[1] == 0:
            return []  # onnxruntime drops a ReLU before a quantizer whose zero point is the minimum
        data_inputs = source.input if source.op_type == "Concat" else source.input[:1]
        added = []
        for t in list(data_inputs):
            if self.dequantized_by(t) != params:
                added.append(self.insert_pair(t, [source], *params, self.producer(t)))
        return added
