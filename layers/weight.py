"""WeightARQ: fake quantization of a layer's weights (2 to 8 bits) from float master weights."""
import caffe

from amct_retrain import kernels, numerics, tensorboard
from amct_retrain.errors import LayerParamError
from amct_retrain.layer_specs import LAST_MAX, LAST_MIN, WEIGHT_ARQ, shares_memory

# With the optional clip_state (a per-channel Convolution): scale_w comes after it.
FAKE_QUANT_WEIGHTS, MASTER_WEIGHTS, CLIP_STATE = (WEIGHT_ARQ.blob(name, {"clip_state"})
                                                  for name in ("fake_quant_weights", "master_weights", "clip_state"))
TRAIN = 0


class WeightARQ(caffe.Layer):
    """Placed in place on the quantized layer's input path, so it runs just before that
    layer in forward and just after it in backward.

    Blobs (shape ``weight_shape``): 0 the fake-quantized weights, shared with the quantized
    layer's weights through ``param { name }``; 1 the float master weights the solver trains.
    Forward writes ARQ(master) into blob 0; backward moves blob 0's diff into the master's
    diff (straight-through) and zeroes blob 0's diff so the solver leaves blob 0 alone.
    With a ``log_dir`` in param_str, every ``log_every``-th TRAIN forward call logs the
    min/mean/max weight scale and a histogram of the master weights to TensorBoard (step: the
    call's index).

    With ``activation_quantizer`` and ``conv`` in param_str (a per-channel Convolution), blob 2
    is that quantizer's clip state (shared): when the convolution's output is 1 x 1 (a "global
    conv"), the deploy model gives every channel the largest deq (contract section 3), so the
    weights are fake-quantized with the unified scale_w computed from the pair the quantizer
    used in this very forward pass, as ShiftNSearch records it.
    """

    def setup(self, bottom, top):
        p = WEIGHT_ARQ.parse(self.param_str)
        self.layer_name, self.channel_axis = p["name"], p["channel_axis"]
        self.where = f"WeightARQ layer '{self.layer_name}' (master weights)"  # error prefix, formatted once
        self.num_bits_w, self.num_bits_d = p["num_bits_w"], p["num_bits_d"]
        shape = p["weight_shape"]
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise LayerParamError(f"WeightARQ layer '{self.layer_name}': param_str key 'weight_shape' "
                                  f"must be a list of positive ints, got {shape!r}")
        if self.channel_axis is not None and not 0 <= self.channel_axis < len(shape):
            raise LayerParamError(f"WeightARQ layer '{self.layer_name}': param_str key 'channel_axis' "
                                  f"{self.channel_axis} is outside weight_shape {shape}")
        if len(bottom) != len(top):
            raise LayerParamError(f"WeightARQ layer '{self.layer_name}': needs as many tops as bottoms")
        # A layer's bottom Blobs are fixed for the net's life (their memory is not); RawBlobVec
        # supports indexing, not iteration.
        self.bottom_blobs = tuple(bottom[i] for i in range(len(bottom)))
        self.blobs.add_blob(*shape)
        self.blobs.add_blob(*shape)
        self.conv = None
        present = set()
        if p["activation_quantizer"] is not None:
            present.add("clip_state")
            self.conv = p["conv"]
            if not (isinstance(self.conv, dict) and {"kernel", "stride", "pad", "dilation"} <= set(self.conv)):
                raise LayerParamError(f"WeightARQ layer '{self.layer_name}': param_str key 'conv' must hold the "
                                      f"convolution's kernel, stride, pad and dilation, got {self.conv!r}")
            self.blobs.add_blob(3)
        # Last blob: the scale_w this forward used, shared (not learnt) with ShiftNSearch, which
        # would otherwise share the master weights and make every snapshot hold them twice.
        self.scale_count = shape[self.channel_axis] if self.channel_axis is not None else 1
        self.blobs.add_blob(self.scale_count)
        # The Blob objects stay for the layer's life (Caffe re-points their memory, not them).
        self.master_blob, self.fake_quant_blob = self.blobs[MASTER_WEIGHTS], self.blobs[FAKE_QUANT_WEIGHTS]
        self.scale_w_blob = self.blobs[WEIGHT_ARQ.blob("scale_w", present)]
        self.state_blob = self.blobs[CLIP_STATE] if "clip_state" in present else None
        self.output_shape = ()  # the convolution's output shape (with conv), to tell a global conv
        self.in_place = None
        self.input_shapes: tuple[tuple[int, ...], ...] | None = None
        self.arq = kernels.ArqLayerKernels(tuple(shape), self.channel_axis, self.num_bits_w)
        self.log = tensorboard.layer_log(p, "WeightARQ")

    def reshape(self, bottom, top):
        # Caffe calls this before every forward: only a new input shape has work to do.
        shapes = tuple([b.data.shape for b in self.bottom_blobs])
        if shapes == self.input_shapes:
            return
        self.input_shapes = shapes
        for i in range(len(bottom)):
            top[i].reshape(*shapes[i])
        in_shape = shapes[0]
        self.in_place = all(shares_memory(bottom[i], top[i]) for i in range(len(bottom)))
        self.output_shape = ((*in_shape[:2], *numerics.conv_output_hw(in_shape[2:], self.conv))
                             if self.conv is not None and len(in_shape) == 4 else ())

    def forward(self, bottom, top):
        master = self.master_blob.data
        fake_quant = self.fake_quant_blob.data
        with numerics.errors_named(self.where):
            if numerics.is_global_conv(self.output_shape, self.scale_count):
                # The pair the ActivationULQ used in this forward pass (it runs just before this layer).
                state = self.state_blob.data
                scale_d, _ = numerics.ulq_deploy_factors(float(state[LAST_MIN]), float(state[LAST_MAX]),
                                                         self.num_bits_d)
                scale_w = numerics.unify_global_conv_scales(
                    scale_d, kernels.arq_scale(master, self.channel_axis, self.num_bits_w))
                kernels.arq_fake_quantize(master, scale_w, self.channel_axis, self.num_bits_w, out=fake_quant)
                self.scale_w_blob.data[...] = scale_w
            else:
                scale_w = self.arq.forward(master, fake_quant, self.scale_w_blob.data)
        if self.log is not None and self.phase == TRAIN and self.log.count():
            self.log.write(tensorboard.arq_scalars(self.layer_name, scale_w))
            self.log.write_histograms(tensorboard.arq_histograms(self.layer_name, master))
        if not self.in_place:
            for i in range(len(bottom)):
                top[i].data[...] = bottom[i].data

    def backward(self, top, propagate_down, bottom):
        self.arq.move_gradient(self.fake_quant_blob.diff, self.master_blob.diff)
        if not self.in_place:
            for i in range(len(bottom)):
                if propagate_down[i]:
                    bottom[i].diff[...] = top[i].diff
