"""Edits to the Kokoro ONNX graph for runtimes that compute in bfloat16 (OpenVINO on AMX).

Pure graph rewrites of the verified int8 model (tts_core/embedded/runners.py applies them and
caches the result); OpenVINO's profile of one 4 s call went 0.58 -> 0.39 s with 2-4:

1. ``dequantize_convs``: the published model was quantized dynamically: before every
   ``ConvInteger`` / ``MatMulInteger`` the input is quantized to 8 bits
   (``DynamicQuantizeLinear``) and after it the int32 sums are rescaled (``Add`` of the
   quantized bias, ``Cast``, ``Mul`` by the two scales). Integer products cannot use the CPU's
   bfloat16 matrix units; each such group becomes one float ``Conv`` / ``MatMul`` whose weight
   is the int8 weight dequantized (``(w - zero_point) * scale``) and whose bias is the float
   bias the quantized one was made from: the same weights, and the input is no longer rounded
   to 8 bits.
2. ``round_up_frames``: the decoder's length (audio frames) follows the predicted durations, so
   nearly every request has a length the runtime has not seen. OpenVINO prepares its kernels per
   input shape, and a new shape cost 1.3-2.5x the run itself. Rounding the total up to a multiple
   of a few frames, by lengthening the final pad token (silence the engine trims), bounds the
   number of shapes, so after warm-up every run finds its kernels ready. (Shortening the
   opening pad's silence instead cost intelligibility: Whisper's error rate rose from 1-5 % to
   14 %, so its duration is left as predicted.)
3. ``polynomial_snake_sines``: the decoder's snake activations as multiply-adds.
4. ``stft_as_convolution``: the vocoder's STFT of its harmonic source as a strided convolution.
5. ``integer_source_phase``: the harmonic source's phase summed in integers, so bfloat16 never
   rounds a phase of thousands of radians (it moved a male voice's pitch from 131 to 198 Hz).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

FRAME_SAMPLES = 600  # audio samples (24 kHz) per predicted duration unit


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)

    def array(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type:
            return users[0]
        return None

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None


def _float_bias(g: _Graph, quantized_bias: str) -> np.ndarray | None:
    """The float bias behind ``Reshape(Cast(Floor(Div(bias, scale))))``, the way the quantizer
    writes a bias; None if it was written another way."""
    node = g.made_by(quantized_bias, "Reshape")
    for op in ("Cast", "Floor", "Div"):
        node = node and g.made_by(node.input[0], op)
    return None if node is None else g.array(node.input[0])


def _rewrite_one(g: _Graph, conv: onnx.NodeProto) -> tuple[list[onnx.NodeProto],
                                                             onnx.NodeProto, list] | None:
    """(nodes to remove, the float Conv replacing them, its new initializers), or None when
    the group does not have the quantizer's shape (it is then left as it is)."""
    quantize = g.made_by(conv.input[0], "DynamicQuantizeLinear")
    weight = g.array(conv.input[1])
    if quantize is None or weight is None:
        return None
    zero = g.array(conv.input[3]) if len(conv.input) > 3 and conv.input[3] else 0
    add = g.only_consumer(conv.output[0], "Add")
    cast = g.only_consumer((add or conv).output[0], "Cast")
    mul = cast and g.only_consumer(cast.output[0], "Mul")
    if mul is None:
        return None
    scales = g.made_by(next(i for i in mul.input if i != cast.output[0]), "Mul")
    weight_scale = None if scales is None else next(
        (g.array(i) for i in scales.input if i in g.inits), None)
    if weight_scale is None or quantize.output[1] not in scales.input:
        return None
    weight_scale = weight_scale.astype(np.float32)
    if weight_scale.ndim == 1 and conv.op_type == "ConvInteger":  # per output channel
        weight_scale = weight_scale.reshape(-1, *([1] * (weight.ndim - 1)))
    dequantized = (weight.astype(np.float32) - np.float32(zero)) * weight_scale
    inputs = [quantize.input[0], conv.name + "_float_weight"]
    new_inits = [numpy_helper.from_array(dequantized.astype(np.float32), inputs[1])]
    if add is not None:
        bias_input = next(i for i in add.input if i != conv.output[0])
        bias = _float_bias(g, bias_input)
        if bias is None:
            return None
        inputs.append(conv.name + "_float_bias")
        new_inits.append(numpy_helper.from_array(bias.astype(np.float32).ravel(), inputs[2]))
    float_op = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}[conv.op_type]
    replacement = onnx.helper.make_node(float_op, inputs, [mul.output[0]],
                                        name=conv.name + "_float")
    replacement.attribute.extend(conv.attribute)
    removed = [conv, cast, mul] + ([add] if add is not None else [])
    return removed, replacement, new_inits


def _splice(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], at: onnx.NodeProto,
            *, replace: bool = False, after: bool = False) -> None:
    """Put ``nodes`` where ``at`` is (``replace``: instead of it; ``after``: just after it),
    keeping the graph's node list in topological order."""
    position = list(graph.node).index(at) + (1 if after else 0)
    if replace:
        graph.node.remove(at)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes nothing reads any more and initializers no node reads."""
    while True:
        needed = {o.name for o in graph.output}
        for n in graph.node:
            needed.update(n.input)
        dead = [n for n in graph.node if not any(o in needed for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def dequantize_convs(model: onnx.ModelProto, op_types: tuple[str, ...] = ("ConvInteger",)
                     ) -> int:
    """Rewrite ``model`` in place; return how many integer operations (``ConvInteger``, and
    ``MatMulInteger`` if asked) became float ones (``Conv``, ``MatMul``)."""
    graph = model.graph
    g = _Graph(graph)
    rewrites = [r for r in (_rewrite_one(g, n) for n in graph.node if n.op_type in op_types)
                if r is not None]
    for removed, replacement, new_inits in rewrites:
        for node in removed[1:]:
            graph.node.remove(node)
        _splice(graph, [replacement], removed[0], replace=True)
        graph.initializer.extend(new_inits)
    _prune(graph)
    return len(rewrites)


def _duration_clip(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The node that yields the rounded durations: Div(.., speed) -> Round -> Clip."""
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type == "Clip" and source is not None and source.op_type == "Round":
            divide = producer.get(source.input[0])
            if divide is not None and divide.op_type == "Div" and "speed" in divide.input:
                return node
    raise ValueError("no duration rounding (Div by speed -> Round -> Clip) in this model")


def round_up_frames(model: onnx.ModelProto, multiple: int) -> None:
    """Make the total predicted duration a multiple of ``multiple`` units (in place) by adding
    the shortfall to the last token, the closing pad (silence the engine trims)."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    graph = model.graph
    clip = _duration_clip(graph)
    durations = clip.output[0]  # float, (1, tokens)
    p = "round_up_frames_"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(float(multiple), np.float32), p + "multiple"),
        numpy_helper.from_array(np.array([1], np.int64), p + "one"),
    ])
    nodes = [
        helper.make_node("ReduceSum", [durations], [p + "total"], keepdims=0),
        helper.make_node("Div", [p + "total", p + "multiple"], [p + "ratio"]),
        helper.make_node("Ceil", [p + "ratio"], [p + "ceil"]),
        helper.make_node("Mul", [p + "ceil", p + "multiple"], [p + "rounded"]),
        helper.make_node("Sub", [p + "rounded", p + "total"], [p + "shortfall"]),
        helper.make_node("Reshape", [p + "shortfall", p + "one"], [p + "last"]),
        helper.make_node("Shape", [durations], [p + "tokens"], start=1, end=2),
        helper.make_node("Sub", [p + "tokens", p + "one"], [p + "others"]),
        helper.make_node("ConstantOfShape", [p + "others"], [p + "zeros"],
                         value=numpy_helper.from_array(np.array([0], np.float32))),
        helper.make_node("Concat", [p + "zeros", p + "last"], [p + "extra"], axis=0),
        helper.make_node("Add", [durations, p + "extra"], [p + "durations"]),
    ]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == durations:
                node.input[i] = p + "durations"
    _splice(graph, nodes, clip, after=True)

# sin(r) on [-pi/2, pi/2], Taylor to r^9: largest error 4e-6, below bfloat16's resolution.
_SINE_TERMS = (1 / 362880, -1 / 5040, 1 / 120, -1 / 6, 1.0)


def polynomial_snake_sines(model: onnx.ModelProto) -> int:
    """Replace each ``Sin`` whose result is only squared (the decoder's snake activations,
    x + sin(a x)^2 / a) by a polynomial (in place); return how many. sin(y)^2 has period pi,
    so y is reduced to r = y - pi * round(y / pi) in [-pi/2, pi/2] and sin(r) is a short
    Horner polynomial: plain multiply-adds the runtime fuses into one vectorized kernel,
    where it ran ``Sin`` element by element with conversions to float32 around each one
    (a third of the decoder's time). The harmonic source's ``Sin`` of a phase that grows to
    thousands of radians is left alone."""
    graph = model.graph
    g = _Graph(graph)
    constants = {"inv_pi": 1 / np.pi, "pi": np.pi, **{f"c{i}": c
                                                        for i, c in enumerate(_SINE_TERMS)}}
    p = "snake_sine_"
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), p + k)
                             for k, v in constants.items())
    count = 0
    for sin in [n for n in graph.node if n.op_type == "Sin"]:
        users = g.consumers.get(sin.output[0], [])
        exponent = [g.array(u.input[1]) for u in users if u.op_type == "Pow"]
        if not users or len(exponent) != len(users) or any(
                e is None or float(e) != 2.0 for e in exponent):
            continue
        q = f"{p}{count}_"
        y, out = sin.input[0], sin.output[0]
        nodes = [
            helper.make_node("Mul", [y, p + "inv_pi"], [q + "turns"]),
            helper.make_node("Round", [q + "turns"], [q + "k"]),
            helper.make_node("Mul", [q + "k", p + "pi"], [q + "kpi"]),
            helper.make_node("Sub", [y, q + "kpi"], [q + "r"]),
            helper.make_node("Mul", [q + "r", q + "r"], [q + "r2"]),
        ]
        acc = p + "c0"
        for i in range(1, len(_SINE_TERMS)):
            nodes += [helper.make_node("Mul", [acc, q + "r2"], [q + f"m{i}"]),
                      helper.make_node("Add", [q + f"m{i}", p + f"c{i}"], [q + f"h{i}"])]
            acc = q + f"h{i}"
        nodes.append(helper.make_node("Mul", [acc, q + "r"], [out]))
        _splice(graph, nodes, sin, replace=True)
        count += 1
    return count


def stft_as_convolution(model: onnx.ModelProto) -> int:
    """Replace each ``STFT`` with a constant window and frame length (the vocoder's analysis of
    its harmonic source) by a strided ``Conv`` with the windowed DFT basis as its weights, in
    place; return how many. The runtime ran STFT as a float32 loop (a tenth of the model's
    time); as a convolution it takes the matrix units like every other layer."""
    graph = model.graph
    g = _Graph(graph)
    count = 0
    for stft in [n for n in graph.node if n.op_type == "STFT"]:
        onesided = next((a.i for a in stft.attribute if a.name == "onesided"), 1)
        step, window, length = (g.array(i) if i else None for i in stft.input[1:4])
        if not onesided or step is None or window is None or window.ndim != 1:
            continue
        size = int(length) if length is not None else len(window)
        bins = size // 2 + 1
        n, k = np.arange(size), np.arange(bins)[:, None]
        angle = 2 * np.pi * k * n / size
        basis = np.stack([np.cos(angle), -np.sin(angle)], axis=1) * window  # (bins, 2, size)
        q = f"stft_conv_{count}_"
        graph.initializer.extend([
            numpy_helper.from_array(basis.reshape(2 * bins, 1, size).astype(np.float32),
                                    q + "basis"),
            numpy_helper.from_array(np.array([0, 1, -1], np.int64), q + "as_channels"),
            numpy_helper.from_array(np.array([0, bins, 2, -1], np.int64), q + "split"),
        ])
        nodes = [
            helper.make_node("Reshape", [stft.input[0], q + "as_channels"], [q + "signal"]),
            helper.make_node("Conv", [q + "signal", q + "basis"], [q + "spectrum"],
                             strides=[int(step)], kernel_shape=[size]),
            helper.make_node("Reshape", [q + "spectrum", q + "split"], [q + "bins"]),
            # (batch, bins, re/im, frames) -> (batch, frames, bins, re/im), as STFT gives
            helper.make_node("Transpose", [q + "bins"], [stft.output[0]], perm=[0, 3, 1, 2]),
        ]
        _splice(graph, nodes, stft, replace=True)
        count += 1
    return count


PHASE_STEPS = 4096  # the harmonic source's phase in 1/4096ths of a turn


def integer_source_phase(model: onnx.ModelProto) -> bool:
    """Keep the harmonic source's phase exact when the runtime computes in bfloat16 (in place).

    The vocoder builds its source as sin(2 pi x 300 x C), C the running sum of f0 / sample
    rate over frames, linearly interpolated to the 300 samples of each frame: a phase that grows
    to thousands of radians, hopeless in bfloat16 (8 significant bits), and the voice's pitch
    then went wrong. A linear interpolation of a running sum is the running sum, sample by
    sample, of each frame's increment held for its 300 samples; here that sum is taken in
    int32 fixed point (1/4096 of a turn per unit) and reduced to one turn before it becomes a
    float again, so only a phase within one turn is ever rounded. (It starts half a frame
    earlier than the interpolation did: a constant phase offset, which the model was trained
    to ignore with a random one.)"""
    graph = model.graph
    g = _Graph(graph)
    cumsum = next((n for n in graph.node if n.op_type == "CumSum" and "sin_gen" in n.name), None)
    if cumsum is None:
        return False
    chain, node = [], cumsum
    while node is not None and node.op_type != "Sin":
        users = g.consumers.get(node.output[0], [])
        node = users[0] if len(users) == 1 else None
        if node is not None and node.op_type != "Sin":
            chain.append(node)
    scale, resize = 1.0, None
    for n in chain:
        if n.op_type == "Mul":
            scale *= float(next(g.array(i) for i in n.input if i in g.inits))
        if n.op_type == "Resize":
            resize = g.array(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if node is None or resize is None or [n.op_type for n in chain if n.op_type != "Mul"] != [
            "Transpose", "Resize", "Transpose"]:
        return False
    factor = int(round(float(resize[-1])))
    if not np.isclose(scale, 2 * np.pi * factor):
        return False
    sin = node
    p = "integer_phase_"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(PHASE_STEPS, np.float32), p + "steps_per_turn"),
        numpy_helper.from_array(np.array([2], np.int64), p + "axis2"),
        numpy_helper.from_array(np.array([1, 1, factor, 1], np.int64), p + "repeats"),
        numpy_helper.from_array(np.array([0, -1], np.int64), p + "batch_time"),
        numpy_helper.from_array(np.array(PHASE_STEPS, np.int32), p + "turn"),
        numpy_helper.from_array(np.array(2 * np.pi / PHASE_STEPS, np.float32), p + "to_radians"),
    ])
    nodes = [  # x: (batch, frames, harmonics), each frame's phase increment per sample in turns
        helper.make_node("Mul", [cumsum.input[0], p + "steps_per_turn"], [p + "steps"]),
        helper.make_node("Unsqueeze", [p + "steps", p + "axis2"], [p + "frames"]),
        helper.make_node("Tile", [p + "frames", p + "repeats"], [p + "held"]),
        helper.make_node("Shape", [p + "steps"], [p + "harmonics"], start=2),
        helper.make_node("Concat", [p + "batch_time", p + "harmonics"], [p + "samples"], axis=0),
        helper.make_node("Reshape", [p + "held", p + "samples"], [p + "per_sample_f"]),
        # rounded and made integer only here, away from the interpolation before it, which
        # the runtime would otherwise fuse with the conversion and refuse
        helper.make_node("Round", [p + "per_sample_f"], [p + "per_sample_r"]),
        helper.make_node("Cast", [p + "per_sample_r"], [p + "per_sample"],
                         to=onnx.TensorProto.INT32),
        helper.make_node("CumSum", [p + "per_sample", cumsum.input[1]], [p + "sum"]),
        helper.make_node("Mod", [p + "sum", p + "turn"], [p + "in_turn"]),
        helper.make_node("Cast", [p + "in_turn"], [p + "in_turn_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [p + "in_turn_f", p + "to_radians"], [p + "phase"]),
    ]
    sin.input[0] = p + "phase"
    _splice(graph, nodes, sin)
    _prune(graph)
    _downsample_by_slicing(graph, factor)
    return True


def _downsample_by_slicing(graph: onnx.GraphProto, factor: int) -> None:
    """The source's per-frame increments are a linear (half-pixel) resize of per-sample ones
    by 1/factor: the mean of samples factor*k + factor/2 - 1 and factor*k + factor/2, taken
    here with two strided slices. The runtime refused that resize once its result fed integer
    arithmetic."""
    g = _Graph(graph)
    for resize in [n for n in graph.node if n.op_type == "Resize" and "sin_gen" in n.name]:
        scales = g.array(resize.input[2]) if len(resize.input) > 2 and resize.input[2] else None
        modes = {a.name: a.s for a in resize.attribute}
        if (scales is None or not np.isclose(scales[-1] * factor, 1.0) or factor % 2
                or modes.get("mode") != b"linear"
                or modes.get("coordinate_transformation_mode") != b"half_pixel"):
            continue
        q = "integer_phase_frames_"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([factor // 2 - 1], np.int64), q + "first"),
            numpy_helper.from_array(np.array([factor // 2], np.int64), q + "second"),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), q + "end"),
            numpy_helper.from_array(np.array([scales.size - 1], np.int64), q + "axis"),
            numpy_helper.from_array(np.array([factor], np.int64), q + "step"),
            numpy_helper.from_array(np.array(0.5, np.float32), q + "half"),
        ])
        x = resize.input[0]
        nodes = [
            helper.make_node("Slice", [x, q + "first", q + "end", q + "axis", q + "step"],
                             [q + "a"]),
            helper.make_node("Slice", [x, q + "second", q + "end", q + "axis", q + "step"],
                             [q + "b"]),
            helper.make_node("Add", [q + "a", q + "b"], [q + "sum"]),
            helper.make_node("Mul", [q + "sum", q + "half"], [resize.output[0]]),
        ]
        _splice(graph, nodes, resize, replace=True)
