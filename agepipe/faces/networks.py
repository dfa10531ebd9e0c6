"""dlib's ResNets on LiteRT. The face-recognition network, read from dlib's own weight file: the
descriptors of dlib's `face_recognition_model_v1.compute_face_descriptor`, equal to float rounding
(tested), about ten times faster (dlib-bin's build runs the network without BLAS: 90-180 ms a face on
one core here; LiteRT's XNNPACK 8-9 ms). And Cydral's age network, a dlib ResNet-10 exported to ONNX,
read through OpenCV's ONNX importer: OpenCV's own run of it to float rounding (tested, and checked on
a probe chip each time it is built), in about half the time (2.4 ms a 64x64 chip on a core against 5).

The network, as dlib's `dnn_face_recognition_ex.cpp` defines it: a 7x7 stride-2 convolution and a 3x3
stride-2 max pool, then 14 residual blocks of two 3x3 convolutions (3 of 32 filters, 4 of 64, 3 of 128,
4 of 256). The first block of each new width halves the size: its first convolution has stride 2 and
no padding, and its shortcut is a 2x2 average pool, given zero channels up to the new width. Where the
two branches disagree in size, dlib adds them over the larger, the smaller zero-padded at its bottom
and right. A global average and a 128-wide linear layer end it. The age network is built of the same
blocks (one of 64 filters, two of 128, two of 256), its linear layer has a bias and 81 outputs. Each
convolution's affine (frozen batch-norm) layer is folded into it, and the input layer's scaling into
the first.

The LiteRT model is built in memory with the flatbuffer schema LiteRT ships: TensorFlow is not needed,
and nothing is converted or written.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from agepipe.running.console import native_stderr_silenced

CHIP_SIDE = 150  # the network reads 150x150 aligned RGB face chips
BLOCKS, DESCRIPTOR_WIDTH = 14, 128
# An exported network read right gives OpenCV's probabilities to float rounding (1.5e-6 measured here);
# one read wrongly is off by far more.
PROBE_TOLERANCE = 1e-4
INPUT_SCALE = np.float32(1 / 256)  # dlib's input layer scales each pixel's distance from the channel mean by this
# The serialized names dlib gives the layers that hold weights, preceded by dlib's length prefix.
_WEIGHT_LAYERS = re.compile(rb"\x01\x15input_rgb_image_sized|\x01\x05con_4|\x01\x07affine_|\x01\x04fc_2")


@dataclass(frozen=True)
class Convolution:
    """A convolution with its affine layer folded in: `weights` in LiteRT's (out, rows, cols, in) order."""

    weights: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int


@dataclass(frozen=True)
class ResNetWeights:
    """A network's numbers: the input's per-channel mean and scale (each value becomes (value - mean)
    * scale), the convolutions in order, the linear layer as (outputs, inputs) and its bias, if any."""

    input_mean: np.ndarray
    input_scale: np.float32
    convolutions: list[Convolution]
    linear: np.ndarray
    linear_bias: np.ndarray | None = None


class _Reader:
    """dlib's serialization: integers as a length byte (0x80 set when negative) and that many little-
    endian bytes; strings as their length and bytes; floats as an integer mantissa and exponent;
    tensors as a version, four dimensions and little-endian float32s."""

    def __init__(self, data: bytes, position: int):
        self.data, self.position = data, position

    def integer(self) -> int:
        head = self.data[self.position]
        size = head & 0x0F
        value = int.from_bytes(self.data[self.position + 1:self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if head & 0x80 else value

    def string(self) -> str:
        size = self.integer()
        self.position += size
        return self.data[self.position - size:self.position].decode("ascii")

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
            weights = params[:filters * channels * rows * cols].reshape(filters, channels, rows, cols).transpose(0, 2, 3, 1)
            pending = (weights, params[-filters:], stride, padding)
        elif name == "affine_":
            scale, shift = np.split(reader.tensor(), 2)
            weights, bias, stride, padding = pending
            convolutions.append(Convolution(np.ascontiguousarray(weights * scale[:, None, None, None]), bias * scale + shift, stride, padding))
        else:
            outputs, inputs = reader.integer(), reader.integer()
            linear = reader.tensor().reshape(inputs, outputs).T.copy()
    if input_mean is None or linear is None or len(convolutions) != 1 + 2 * BLOCKS or linear.shape[0] != DESCRIPTOR_WIDTH:
        raise ValueError("not all of its layers were found")
    return ResNetWeights(input_mean, INPUT_SCALE, convolutions, linear)


def read_exported_weights(network, path: str | os.PathLike, input_mean, input_scale: float) -> ResNetWeights:
    """The weights of a dlib ResNet exported to ONNX with dlib's layer names (Cydral's age network), from
    OpenCV's import of the file at `path` (`network`): each convolution followed by its affine layer's
    scale and offset, a linear layer with a bias last. The block convolutions that widen the network
    halve its size (dlib's `ares_down`). Raises ValueError when the file is not such a network."""
    layers = [network.getLayer(name) for name in network.getLayerNames()]
    convolutions, linear = [], None
    for index, layer in enumerate(layers):
        if layer.type == "Convolution":
            constants = [other for other in layers[index + 1:index + 5] if other.type == "Const"][:2]
            if [constant.name.rsplit("_", 1)[-1] for constant in constants] != ["scale", "offset"]:
                raise ValueError(f"{path}: convolution {layer.name} is not followed by dlib's affine layer")
            weights, bias = (blob.astype(np.float32) for blob in layer.blobs)
            scale, offset = (constant.blobs[0].reshape(-1) for constant in constants)
            filters, channels = weights.shape[:2]
            first_of_block = len(convolutions) % 2 == 1
            stride, padding = (2, 0) if not convolutions or (first_of_block and filters != channels) else (1, weights.shape[2] // 2)
            convolutions.append(Convolution(np.ascontiguousarray(weights.transpose(0, 2, 3, 1) * scale[:, None, None, None]),
                                            bias.reshape(-1) * scale + offset, stride, padding))
        elif layer.type == "Gemm":
            weights, bias = layer.blobs
            linear = (np.ascontiguousarray(weights.T, np.float32), bias.reshape(-1).astype(np.float32))
    if linear is None or len(convolutions) % 2 == 0:
        raise ValueError(f"{path} is not a dlib ResNet exported to ONNX: its layers are not those of one")
    return ResNetWeights(np.asarray(input_mean, np.float32), np.float32(input_scale), convolutions, *linear)


def _unpadded(length: int, window: int, stride: int) -> int:
    """The output length of an unpadded (VALID) window sliding over `length` by `stride`."""
    return (length - window) // stride + 1


class _Graph:
    """A LiteRT subgraph being built: tensors, constant buffers and operators, float32 throughout."""

    def __init__(self):
        self.tensors, self.buffers, self.operators, self.codes = [], [schema.BufferT()], [], []

    def tensor(self, shape, constant: np.ndarray | None = None) -> int:
        tensor = schema.TensorT()
        tensor.shape = np.array(shape, np.int32)
        tensor.type = schema.TensorType.INT32 if constant is not None and constant.dtype == np.int32 else schema.TensorType.FLOAT32
        tensor.buffer = 0
        if constant is not None:
            buffer = schema.BufferT()
            buffer.data = np.ascontiguousarray(constant).reshape(-1).view(np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        tensor.name = f"t{len(self.tensors)}".encode()
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def operator(self, code: int, inputs: list[int], shape, options_type: int = 0, options=None) -> int:
        if code not in self.codes:
            self.codes.append(code)
        operator = schema.OperatorT()
        operator.opcodeIndex, operator.inputs = self.codes.index(code), np.array(inputs, np.int32)
        operator.outputs = np.array([self.tensor(shape)], np.int32)
        operator.builtinOptionsType, operator.builtinOptions = options_type, options
        self.operators.append(operator)
        return int(operator.outputs[0])

    def shape(self, tensor: int) -> list[int]:
        return [int(n) for n in self.tensors[tensor].shape]

    def convolution(self, x: int, layer: Convolution, relu: bool) -> int:
        _, height, width, _ = self.shape(x)
        filters, rows, cols, _ = layer.weights.shape
        options = schema.Conv2DOptionsT()
        options.strideH = options.strideW = layer.stride
        options.dilationHFactor = options.dilationWFactor = 1
        options.fusedActivationFunction = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
        if layer.padding == 0:
            options.padding, out = schema.Padding.VALID, (_unpadded(height, rows, layer.stride), _unpadded(width, cols, layer.stride))
        elif layer.stride == 1 and layer.padding == rows // 2 == cols // 2:
            options.padding, out = schema.Padding.SAME, (height, width)
        else:
            raise ValueError(f"a convolution padded by {layer.padding} with stride {layer.stride} is not a dlib ResNet's")
        inputs = [x, self.tensor(layer.weights.shape, layer.weights), self.tensor([filters], layer.bias)]
        return self.operator(schema.BuiltinOperator.CONV_2D, inputs, [1, *out, filters], schema.BuiltinOptions.Conv2DOptions, options)

    def pool(self, x: int, code: int, side: int, stride: int) -> int:
        _, height, width, channels = self.shape(x)
        options = schema.Pool2DOptionsT()
        options.padding, options.strideH, options.strideW, options.filterHeight, options.filterWidth = schema.Padding.VALID, stride, stride, side, side
        out = [1, _unpadded(height, side, stride), _unpadded(width, side, stride), channels]
        return self.operator(code, [x], out, schema.BuiltinOptions.Pool2DOptions, options)

    def zero_pad(self, x: int, rows: int, channels: int) -> int:
        """`x` with `rows` zero rows and columns after its last, and `channels` zero channels."""
        if not rows and not channels:
            return x
        batch, height, width, depth = self.shape(x)
        paddings = np.array([[0, 0], [0, rows], [0, rows], [0, channels]], np.int32)
        return self.operator(schema.BuiltinOperator.PAD, [x, self.tensor([4, 2], paddings)], [batch, height + rows, width + rows, depth + channels],
                             schema.BuiltinOptions.PadOptions, schema.PadOptionsT())

    def residual_block(self, x: int, first: Convolution, second: Convolution) -> int:
        branch = self.convolution(self.convolution(x, first, relu=True), second, relu=False)
        shortcut = x if first.stride == 1 else self.pool(x, schema.BuiltinOperator.AVERAGE_POOL_2D, 2, 2)
        branch_shape, shortcut_shape = self.shape(branch), self.shape(shortcut)
        branch = self.zero_pad(branch, shortcut_shape[1] - branch_shape[1], 0)
        shortcut = self.zero_pad(shortcut, 0, branch_shape[3] - shortcut_shape[3])
        options = schema.AddOptionsT()
        options.fusedActivationFunction = schema.ActivationFunctionType.RELU
        return self.operator(schema.BuiltinOperator.ADD, [shortcut, branch], self.shape(shortcut), schema.BuiltinOptions.AddOptions, options)

    def model(self, inputs: int, outputs: int) -> bytes:
        subgraph = schema.SubGraphT()
        subgraph.tensors, subgraph.operators = self.tensors, self.operators
        subgraph.inputs, subgraph.outputs = np.array([inputs], np.int32), np.array([outputs], np.int32)
        model = schema.ModelT()
        model.version, model.subgraphs, model.buffers = 3, [subgraph], self.buffers
        model.operatorCodes = []
        for code in self.codes:
            operator_code = schema.OperatorCodeT()
            operator_code.builtinCode, operator_code.deprecatedBuiltinCode, operator_code.version = code, min(code, 127), 1
            model.operatorCodes.append(operator_code)
        # room for every constant from the start: a builder that grows copies itself each time
        builder = flatbuffers.Builder(sum(len(b.data) for b in self.buffers if b.data is not None) + (1 << 20))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(memoryview(builder.Bytes)[builder.Head():])  # one copy (Output() makes two)


@functools.lru_cache(maxsize=1)
def lite_model_of(path: str) -> bytes:
    """The LiteRT model of dlib's face descriptor weight file at `path`, built once per process: a stage
    builds it before its worker pool forks (which checks the file too), so that every worker shares it."""
    return lite_model(read_weights(path), CHIP_SIDE)


@functools.lru_cache(maxsize=1)
def lite_exported_model_of(path: str, input_mean: tuple, input_scale: float, side: int) -> bytes:
    """The LiteRT model of a dlib ResNet exported to ONNX (read_exported_weights), built once per
    process, as lite_model_of, ending in a softmax as the file's network does. The reader assumes
    dlib's layout, so the model is checked against OpenCV's own run of the file on a probe chip: a file
    exported otherwise is refused (ValueError), never run wrongly."""
    import cv2

    try:
        network = cv2.dnn.readNetFromONNX(path)
    except cv2.error:
        raise ValueError(f"{path} is not an ONNX file OpenCV reads") from None
    content = lite_model(read_exported_weights(network, path, input_mean, input_scale), side, softmax=True)
    probe = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    probabilities = LiteResNet(content, side).describe_many(probe)
    network.setInput(((probe - np.float32(input_mean)) * np.float32(input_scale)).astype(np.float32).transpose(0, 3, 1, 2))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # no OpenCV thread pool in a process about to fork its workers
    try:
        expected = network.forward()
    finally:
        cv2.setNumThreads(threads)
    if expected.shape != probabilities.shape or not np.allclose(probabilities, expected, atol=PROBE_TOLERANCE):
        raise ValueError(f"{path}, read as a dlib ResNet, does not give OpenCV's outputs on a probe chip")
    return content


def lite_model(weights: ResNetWeights, side: int, softmax: bool = False) -> bytes:
    """The network as a LiteRT flatbuffer: a (1, side, side, 3) float input of RGB values (0-255), its
    (1, outputs) linear layer out, through a softmax with `softmax` (or n of each, the input resized)."""
    graph = _Graph()
    image = graph.tensor([1, side, side, 3])
    first, *pairs = weights.convolutions
    if first.padding:
        raise ValueError("its first convolution is padded: dlib's input layer cannot be folded into it")
    # the input layer, (value - channel mean) * scale, folded into the first convolution: it has no
    # padding, so every value it reads is a pixel's
    scaled = first.weights * weights.input_scale
    first = Convolution(scaled, first.bias - np.einsum("ohwi,i->o", scaled, weights.input_mean), first.stride, 0)
    x = graph.pool(graph.convolution(image, first, relu=True), schema.BuiltinOperator.MAX_POOL_2D, 3, 2)
    for block in range(len(pairs) // 2):
        x = graph.residual_block(x, pairs[2 * block], pairs[2 * block + 1])
    options = schema.ReducerOptionsT()
    options.keepDims = False
    channels = graph.shape(x)[3]
    x = graph.operator(schema.BuiltinOperator.MEAN, [x, graph.tensor([2], np.array([1, 2], np.int32))], [1, channels],
                       schema.BuiltinOptions.ReducerOptions, options)
    linear, bias = weights.linear, weights.linear_bias
    out = graph.operator(schema.BuiltinOperator.FULLY_CONNECTED,
                         [x, graph.tensor(linear.shape, linear), -1 if bias is None else graph.tensor(bias.shape, bias)], [1, linear.shape[0]],
                         schema.BuiltinOptions.FullyConnectedOptions, schema.FullyConnectedOptionsT())
    if softmax:
        options = schema.SoftmaxOptionsT()
        options.beta = 1.0
        out = graph.operator(schema.BuiltinOperator.SOFTMAX, [out], graph.shape(out), schema.BuiltinOptions.SoftmaxOptions, options)
    return graph.model(image, out)


class LiteResNet:
    """A network of lite_model's on RGB chips, run by LiteRT on one thread, `batch` chips at a time
    where there are that many (XNNPACK runs dlib's face network on a batch of 8 in three quarters of
    the time per chip), the rest one at a time."""

    def __init__(self, content: bytes, side: int, batch: int = 1):
        self._content, self.side, self.batch = content, side, batch
        self._interpreters: dict = {}  # by batch size, made on first use: each holds its own packed weights

    def _interpreter(self, size: int) -> tuple:
        """The interpreter for `size` chips at once, with its input and output tensors' indices."""
        if size not in self._interpreters:
            from ai_edge_litert.interpreter import Interpreter

            with native_stderr_silenced():  # LiteRT announces its XNNPACK delegate on stderr when tensors are allocated
                interpreter = Interpreter(model_content=self._content, num_threads=1)
                image = interpreter.get_input_details()[0]["index"]
                interpreter.resize_tensor_input(image, [size, self.side, self.side, 3])
                interpreter.allocate_tensors()
            self._interpreters[size] = (interpreter, image, interpreter.get_output_details()[0]["index"])
        return self._interpreters[size]

    def describe(self, chip: np.ndarray) -> np.ndarray:
        """The output for one (side, side, 3) uint8 RGB chip."""
        return self.describe_many(chip[None])[0]

    def describe_many(self, chips: np.ndarray) -> np.ndarray:
        """The outputs, one row each, for n (side, side, 3) uint8 RGB chips."""
        if chips.ndim != 4 or chips.shape[1:] != (self.side, self.side, 3):
            raise ValueError(f"a chip must be {self.side}x{self.side} RGB, not {chips.shape[1:]}")
        whole = len(chips) - len(chips) % self.batch
        groups = [chips[i:i + self.batch] for i in range(0, whole, self.batch)] + [chips[i:i + 1] for i in range(whole, len(chips))]
        return np.concatenate([self._run(group) for group in groups])

    def _run(self, chips: np.ndarray) -> np.ndarray:
        interpreter, image, out = self._interpreter(len(chips))
        interpreter.set_tensor(image, chips.astype(np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(out).copy()


class FaceDescriptorNetwork(LiteResNet):
    """dlib's 128-D face descriptor of 150x150 aligned RGB chips.

    Examples
    --------
    >>> from agepipe.faces.describer import DESCRIPTOR_MODEL, require_dlib
    >>> network = FaceDescriptorNetwork(require_dlib()[1][DESCRIPTOR_MODEL], batch=4)
    >>> network.describe(np.full((150, 150, 3), 128, np.uint8)).shape
    (128,)
    >>> network.describe_many(np.zeros((6, 150, 150, 3), np.uint8)).shape
    (6, 128)
    """

    def __init__(self, weights_path: str | os.PathLike, batch: int = 1):
        super().__init__(lite_model_of(str(weights_path)), CHIP_SIDE, batch)
