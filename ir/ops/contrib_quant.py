"""Kernel, inference and cost of ONNX Runtime's `com.microsoft.MatMulNBits` (written by
`quantize-weights{format=matmulnbits}` for `--target onnxruntime`), and its packed layout.

MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?) with attributes K, N, bits, block_size
computes `A @ W^T (+ bias)` for the logical weight W [N, K], quantized in blocks of `block_size`
consecutive elements along K (a power of two >= 16), one scale and zero point per block:
`W[n, k] = (code[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]`.

Layout, as ONNX Runtime's operator schema documents it:

- B: uint8 [N, k_blocks, blob_size], k_blocks = ceil(K / block_size), blob_size =
  block_size * bits / 8; codes packed along K low bits first (4 bits: element 2i in the low
  nibble of byte i, element 2i + 1 in the high nibble);
- scales: [N, k_blocks] (older exports: flat [N * k_blocks]), A's float type;
- zero_points: uint8 [N, ceil(k_blocks * bits / 8)] packed the same way, or A's float type
  [N, k_blocks] unpacked; absent: 2^(bits - 1) (8 for 4 bits, 128 for 8 bits);
- g_idx (deprecated) is not supported here; bias: [N].

`pack_codes`/`unpack_codes` are that packing; the tests compare this kernel with ONNX Runtime's.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.errors import GraphoptError, InvalidGraphError
from graphopt.ir.ops.costs import io_bytes, numel
from graphopt.ir.registry import (
    Cost,
    InferenceInputs,
    Kernel,
    KernelEnv,
    register_cost,
    register_inference,
    register_kernel,
)
from graphopt.ir.types import TensorType, Type

__all__ = ["MATMUL_NBITS", "dequantize_nbits", "pack_codes", "unpack_codes"]

MATMUL_NBITS = "com.microsoft.MatMulNBits"


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit codes (uint8 values < 2^bits) along the last axis into bytes,
    low bits first; the last axis is zero-padded to a whole number of bytes."""
    if bits not in (2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes (2, 4 or 8)")
    codes = np.asarray(codes, np.uint8)
    per = 8 // bits
    pad = -codes.shape[-1] % per
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint16)
    shifts = (bits * np.arange(per)).astype(np.uint16)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` codes along the last axis of bytes packed by `pack_codes`."""
    packed = np.asarray(packed, np.uint8)
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """The logical weight W [N, K] of a MatMulNBits, in the scales' float type."""
    blocks = -(-k // block_size)
    codes = unpack_codes(np.asarray(b).reshape(n, blocks, -1), bits, block_size)
    codes = codes.reshape(n, blocks, block_size).astype(np.float32)
    scale = np.asarray(scales).reshape(n, blocks)
    if zero_points is None:
        zero: np.ndarray = np.full((n, blocks), float(1 << (bits - 1)), np.float32)
    elif np.asarray(zero_points).dtype == np.uint8:
        zero = unpack_codes(np.asarray(zero_points).reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = np.asarray(zero_points, np.float32).reshape(n, blocks)
    weight = (codes - zero[..., None]) * scale.astype(np.float32)[..., None]
    return weight.reshape(n, blocks * block_size)[:, :k].astype(scale.dtype)


def _attrs(node: Node) -> tuple[int, int, int, int]:
    k, n = node.get_attr("K"), node.get_attr("N")
    bits, block = int(node.get_attr("bits", 4)), node.get_attr("block_size")
    if k is None or n is None or block is None:
        raise InvalidGraphError(f"{node.describe()}: MatMulNBits needs attributes K, N, block_size")
    if bits not in (2, 4, 8) or block < 16 or block & (block - 1):
        raise InvalidGraphError(
            f"{node.describe()}: bits {bits} (2, 4, 8) or block_size {block} (a power of two "
            ">= 16) is not valid"
        )
    return int(k), int(n), bits, int(block)


@register_kernel(MATMUL_NBITS)
def matmul_nbits_kernel(node: Node, env: KernelEnv) -> Kernel:
    k, n, bits, block = _attrs(node)

    def run(
        a: np.ndarray,
        b: np.ndarray,
        scales: np.ndarray,
        zero_points: np.ndarray | None = None,
        g_idx: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> np.ndarray:
        if g_idx is not None:
            raise GraphoptError(f"{node.describe()}: g_idx (deprecated) is not supported")
        if a.shape[-1] != k:
            raise GraphoptError(f"{node.describe()}: A's last dim is {a.shape[-1]}, K is {k}")
        weight = dequantize_nbits(b, scales, zero_points, k, n, bits, block)
        y = np.matmul(a.astype(np.float32), weight.astype(np.float32).T)
        if bias is not None:
            y = y + np.asarray(bias, np.float32)
        return y.astype(a.dtype)

    return run


@register_inference(MATMUL_NBITS)
def matmul_nbits_inference(node: Node, inputs: InferenceInputs) -> list[Type | None]:
    k, n, _, _ = _attrs(node)
    a = inputs.types[0] if inputs.types else None
    if not isinstance(a, TensorType):
        return [None]
    if a.shape is None:
        return [TensorType(a.dtype, None)]
    if not a.shape:
        raise InvalidGraphError(f"{node.describe()}: A is a scalar")
    last = a.shape[-1]
    if isinstance(last, int) and last != k:
        raise InvalidGraphError(f"{node.describe()}: A's last dim is {last}, K is {k}")
    return [TensorType(a.dtype, (*a.shape[:-1], n))]


@register_cost(MATMUL_NBITS)
def matmul_nbits_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    """2 * (output elements) * K multiply-adds; the dequantization is in the GEMM's packing."""
    out, exact = numel(outputs[0] if outputs else None)
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(2 * out * int(node.get_attr("K", 1)), moved, exact and exact_bytes)
