"""The two pretrained face networks, run by onnxruntime on one thread, many chips at a time.

dlib's face-recognition ResNet has no exported file: its weights are read from dlib's own
`dlib_face_recognition_resnet_model_v1.dat` and its graph is built with `onnx.helper`. Its descriptors
are those of dlib's `face_recognition_model_v1.compute_face_descriptor` to float rounding (tested), in
a fraction of the time (dlib-bin's build runs the network without BLAS: 90-180 ms a face on one core
here; onnxruntime about 6). Cydral's age network ships as ONNX and runs as exported.

dlib's network, as its `dnn_face_recognition_ex.cpp` defines it: a 7x7 stride-2 convolution and a 3x3
stride-2 max pool, then 14 residual blocks of two 3x3 convolutions (3 of 32 filters, 4 of 64, 3 of 128,
4 of 256). The first block of each new width halves the size: its first convolution has stride 2 and
no padding, and its shortcut is a 2x2 average pool, given zero channels up to the new width. Where the
two branches disagree in size, dlib adds them over the larger, the smaller zero-padded at its bottom
and right. A global average and a 128-wide linear layer end it. Each convolution's affine (frozen
batch-norm) layer is folded into it, and the input layer's scaling into the first.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agepipe.running.console import native_stderr_silenced

CHIP_SIDE = 150  # the descriptor network reads 150x150 aligned RGB face chips
BLOCKS, DESCRIPTOR_WIDTH = 14, 128
INPUT_SCALE = np.float32(1 / 256)  # dlib's input layer scales each pixel's distance from the channel mean by this
# The serialized names dlib gives the layers that hold weights, preceded by dlib's length prefix.
_WEIGHT_LAYERS = re.compile(rb"\x01\x15input_rgb_image_sized|\x01\x05con_4|\x01\x07affine_|\x01\x04fc_2")
# The ONNX format and operator versions of the graph built here: ones every supported onnxruntime reads.
ONNX_IR_VERSION, ONNX_OPSET = 8, 17


@dataclass(frozen=True)
class Convolution:
    """A convolution with its affine layer folded in: `weights` as (out, in, rows, cols), ONNX's order and dlib's."""

    weights: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int


@dataclass(frozen=True)
class ResNetWeights:
    """A network's numbers: the input's per-channel mean and scale (each value becomes (value - mean)
    * scale), the convolutions in order, and the linear layer as (outputs, inputs)."""

    input_mean: np.ndarray
    input_scale: np.float32
    convolutions: list[Convolution]
    linear: np.ndarray


class _Reader:
    """dlib's serialization: integers as a length byte (0x80 set when negative) and that many little-
    endian bytes; strings as their length and bytes; floats as an integer mantissa and exponent;
    tensors as a version, four dimensions and little-endian float32s."""

    def __init__(self, data: bytes, position: int):
        self.data, self.position = data, position

    def integer(self) -> int:
        head = self.data[self.position]
        size = head & 0x0F
        value = int.from_bytes(self.data[self.position + 1 : self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if head & 0x80 else value

    def string(self) -> str:
        size = self.integer()
        self.position += size
        return self.data[self.position - size : self.position].decode("ascii")

    def real(self) -> float:
        mantissa = self.integer()
        return mantissa * 2.0 ** self.integer()

    def tensor(self) -> np.ndarray:
        self.integer()  # the format's version
        count = int(np.prod([self.integer() for _ in range(4)]))
        values = np.frombuffer(self.data, "<f4", count, self.position)
        self.position += 4 * count
        return values


def read_weights(path: str | os.PathLike) -> ResNetWeights:
    """The network's weights from dlib's `dlib_face_recognition_resnet_model_v1.dat`.

    dlib writes a network from its input to its output, each layer's name before its numbers; only the
    layers holding numbers are read. Raises ValueError when the file is not that network.
    """
    try:
        return _parse_weights(Path(path).read_bytes())
    except (IndexError, ValueError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not dlib's face-recognition ResNet") from None


def _parse_weights(data: bytes) -> ResNetWeights:
    convolutions, pending, input_mean, linear = [], None, None, None
    for match in _WEIGHT_LAYERS.finditer(data):
        reader = _Reader(data, match.start())
        name = reader.string()
        if name == "input_rgb_image_sized":
            input_mean = np.array([reader.real() for _ in range(3)], np.float32)
        elif name == "con_4":
            params = reader.tensor()
            filters, rows, cols, stride, _, padding, _ = (reader.integer() for _ in range(7))
            channels = (params.size - filters) // (filters * rows * cols)
            weights = params[: filters * channels * rows * cols].reshape(filters, channels, rows, cols)
            pending = (weights, params[-filters:], stride, padding)
        elif name == "affine_":
            scale, shift = np.split(reader.tensor(), 2)
            weights, bias, stride, padding = pending
            convolutions.append(
                Convolution(
                    np.ascontiguousarray(weights * scale[:, None, None, None]), bias * scale + shift, stride, padding
                )
            )
        else:
            outputs, inputs = reader.integer(), reader.integer()
            linear = reader.tensor().reshape(inputs, outputs).T.copy()
    if (
        input_mean is None
        or linear is None
        or len(convolutions) != 1 + 2 * BLOCKS
        or linear.shape[0] != DESCRIPTOR_WIDTH
    ):
        raise ValueError("not all of its layers were found")
    return ResNetWeights(input_mean, INPUT_SCALE, convolutions, linear)


def _unpadded(length: int, window: int, stride: int) -> int:
    """The output length of an unpadded window sliding over `length` by `stride`."""
    return (length - window) // stride + 1


class _Graph:
    """An ONNX graph being built on NCHW float tensors: its nodes and constants, each tensor's shape."""

    def __init__(self):
        self.nodes, self.constants, self.shapes = [], [], {}

    def name(self, shape: list[int]) -> str:
        name = f"t{len(self.shapes)}"
        self.shapes[name] = shape
        return name

    def constant(self, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"c{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, operator: str, inputs: list[str], shape: list[int], **attributes) -> str:
        from onnx import helper

        out = self.name(shape)
        self.nodes.append(helper.make_node(operator, inputs, [out], **attributes))
        return out

    def convolution(self, x: str, layer: Convolution, relu: bool) -> str:
        batch, _, height, width = self.shapes[x]
        filters, _, rows, cols = layer.weights.shape
        out = [
            batch,
            filters,
            *(
                _unpadded(side + 2 * layer.padding, window, layer.stride)
                for side, window in ((height, rows), (width, cols))
            ),
        ]
        y = self.node(
            "Conv",
            [x, self.constant(layer.weights), self.constant(layer.bias.astype(np.float32))],
            out,
            strides=[layer.stride] * 2,
            pads=[layer.padding] * 4,
            kernel_shape=[rows, cols],
        )
        return self.node("Relu", [y], out) if relu else y

    def pool(self, x: str, operator: str, side: int, stride: int) -> str:
        batch, channels, height, width = self.shapes[x]
        return self.node(
            operator,
            [x],
            [batch, channels, _unpadded(height, side, stride), _unpadded(width, side, stride)],
            kernel_shape=[side, side],
            strides=[stride, stride],
        )

    def zero_pad(self, x: str, rows: int, channels: int) -> str:
        """`x` with `rows` zero rows and columns after its last, and `channels` zero channels."""
        if not rows and not channels:
            return x
        batch, depth, height, width = self.shapes[x]
        pads = np.array([0, 0, 0, 0, 0, channels, rows, rows], np.int64)
        return self.node("Pad", [x, self.constant(pads)], [batch, depth + channels, height + rows, width + rows])

    def residual_block(self, x: str, first: Convolution, second: Convolution) -> str:
        branch = self.convolution(self.convolution(x, first, relu=True), second, relu=False)
        shortcut = x if first.stride == 1 else self.pool(x, "AveragePool", 2, 2)
        branch = self.zero_pad(branch, self.shapes[shortcut][2] - self.shapes[branch][2], 0)
        shortcut = self.zero_pad(shortcut, 0, self.shapes[branch][1] - self.shapes[shortcut][1])
        return self.node("Relu", [self.node("Add", [shortcut, branch], self.shapes[shortcut])], self.shapes[shortcut])


def descriptor_graph(weights: ResNetWeights, side: int = CHIP_SIDE) -> bytes:
    """dlib's face network as a serialized ONNX model: n (side, side, 3) RGB chips in, as float values
    0-255, n descriptors out."""
    from onnx import TensorProto, checker, helper

    graph = _Graph()
    first, *pairs = weights.convolutions
    if first.padding:
        raise ValueError("its first convolution is padded: dlib's input layer cannot be folded into it")
    # the input layer, (value - channel mean) * scale, folded into the first convolution: it has no
    # padding, so every value it reads is a pixel's
    scaled = first.weights * weights.input_scale
    first = Convolution(scaled, first.bias - np.einsum("oihw,i->o", scaled, weights.input_mean), first.stride, 0)
    image = graph.name(["n", side, side, 3])
    x = graph.pool(
        graph.convolution(graph.node("Transpose", [image], ["n", 3, side, side], perm=[0, 3, 1, 2]), first, relu=True),
        "MaxPool",
        3,
        2,
    )
    for block in range(len(pairs) // 2):
        x = graph.residual_block(x, pairs[2 * block], pairs[2 * block + 1])
    pooled = graph.node(
        "Flatten", [graph.node("GlobalAveragePool", [x], [*graph.shapes[x][:2], 1, 1])], graph.shapes[x][:2]
    )
    out = graph.node("Gemm", [pooled, graph.constant(weights.linear)], ["n", weights.linear.shape[0]], transB=1)
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "dlib_face_recognition_resnet_model_v1",
            [helper.make_tensor_value_info(image, TensorProto.FLOAT, graph.shapes[image])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, graph.shapes[out])],
            graph.constants,
        ),
        ir_version=ONNX_IR_VERSION,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
    )
    checker.check_model(model)
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def descriptor_model_of(path: str) -> bytes:
    """The ONNX model of dlib's face descriptor weight file at `path`, built once per process: a stage
    builds it before its worker pool forks (which checks the file too), so that every worker shares it."""
    return descriptor_graph(read_weights(path))


class OnnxNetwork:
    """An ONNX model run by onnxruntime on one thread, on (n, side, side, 3) RGB uint8 chips: `prepare`
    turns them into the model's input, its first output comes back. The session is made on first use,
    in the process that uses it (a worker, after the pool forked)."""

    def __init__(self, model: bytes | str | os.PathLike, side: int, prepare=lambda chips: chips.astype(np.float32)):
        self._model, self.side, self._prepare = model if isinstance(model, bytes) else str(model), side, prepare
        self._session = None

    def session(self):
        """The onnxruntime session; ValueError when the model is not one onnxruntime can run."""
        if self._session is None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1  # a worker per core, one thread each
            options.log_severity_level = 3  # errors only: its optimiser's notes are not for users
            try:
                with native_stderr_silenced():
                    self._session = onnxruntime.InferenceSession(
                        self._model, options, providers=["CPUExecutionProvider"]
                    )
            except Exception as exc:  # onnxruntime raises its own types for files it cannot load
                raise ValueError(
                    f"{self._model if isinstance(self._model, str) else 'the model'} is not a model onnxruntime runs "
                    f"({type(exc).__name__})"
                ) from None
        return self._session

    def describe(self, chip: np.ndarray) -> np.ndarray:
        """The output for one (side, side, 3) uint8 RGB chip."""
        return self.describe_many(chip[None])[0]

    def describe_many(self, chips: np.ndarray) -> np.ndarray:
        """The outputs, one row each, for n (side, side, 3) uint8 RGB chips."""
        if chips.ndim != 4 or chips.shape[1:] != (self.side, self.side, 3):
            raise ValueError(f"a chip must be {self.side}x{self.side} RGB, not {chips.shape[1:]}")
        session = self.session()
        return session.run(None, {session.get_inputs()[0].name: self._prepare(chips)})[0]


class FaceDescriptorNetwork(OnnxNetwork):
    """dlib's 128-D face descriptor of 150x150 aligned RGB chips.

    Examples
    --------
    >>> from agepipe.faces.describer import DESCRIPTOR_MODEL, require_dlib
    >>> network = FaceDescriptorNetwork(require_dlib()[1][DESCRIPTOR_MODEL])
    >>> network.describe(np.full((150, 150, 3), 128, np.uint8)).shape
    (128,)
    >>> network.describe_many(np.zeros((6, 150, 150, 3), np.uint8)).shape
    (6, 128)
    """

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__(descriptor_model_of(str(weights_path)), CHIP_SIDE)
