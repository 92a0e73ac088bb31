"""Kernels, inference and costs for ONNX Runtime contrib ops (`com.microsoft`) that fusion passes
emit for `--target onnxruntime`, and fixes for the standard attention ops `fuse-attention` emits.

Standard `Attention` (opset 23): graphopt's own type inference. ONNX's (onnx 1.23) gives the
3-D form's output a last dim of 0 when V's hidden size is unknown (`[b, s, ?]` -> `[b, s, 0]`),
a static dim that then conflicts with the real one; here unknown stays unknown. Its kernel is
`onnx.reference`'s, which runs every attribute combination `fuse-attention` emits (3-D and 4-D,
`kv_num_heads < q_num_heads`, bool and float masks, `is_causal`) exactly as ONNX Runtime does.
"""

from __future__ import annotations

from graphopt.ir.core import Node
from graphopt.ir.registry import InferenceInputs, register_inference
from graphopt.ir.types import Dim, TensorType, Type


def _dims(t: Type | None) -> tuple[Dim, ...] | None:
    return t.shape if isinstance(t, TensorType) else None


def _div(a: Dim, b: int) -> Dim:
    return a // b if isinstance(a, int) and b > 0 and a % b == 0 else None


def _mul(a: Dim, b: int) -> Dim:
    return a * b if isinstance(a, int) else None


def _first(*dims: Dim) -> Dim:
    known = [d for d in dims if d is not None]
    ints = [d for d in known if isinstance(d, int)]
    return ints[0] if ints else (known[0] if known else None)


def _plus(a: Dim, b: Dim) -> Dim:
    return a + b if isinstance(a, int) and isinstance(b, int) else None


@register_inference("Attention")
def attention_inference(node: Node, inputs: InferenceInputs) -> list[Type | None]:
    """Y [b, Hq, S, Dv] (4-D) or [b, S, Hq*Dv] (3-D); present_key/value [b, Hkv, P+L, D/Dv];
    qk_matmul_output [b, Hq, S, P+L]."""
    types = list(inputs.types) + [None] * 6
    q, k, v, past_k = (types[i] for i in (0, 1, 2, 4))
    dq, dk, dv, dp = _dims(q), _dims(k), _dims(v), _dims(past_k)
    out: list[Type | None] = [None] * len(node.outputs)
    rank = len(dq) if dq is not None else len(dk) if dk is not None else None
    if rank not in (3, 4):
        return out
    qn = int(node.get_attr("q_num_heads", 0) or 0)
    kvn = int(node.get_attr("kv_num_heads", 0) or 0)
    if rank == 4:
        b = _first(*(d[0] for d in (dq, dk, dv) if d and len(d) == 4))
        hq = dq[1] if dq and len(dq) == 4 else None
        hkv = _first(*(d[1] for d in (dk, dv) if d and len(d) == 4))
        s = dq[2] if dq and len(dq) == 4 else None
        length = _first(*(d[2] for d in (dk, dv) if d and len(d) == 4))
        head = _first(
            dq[3] if dq and len(dq) == 4 else None, dk[3] if dk and len(dk) == 4 else None
        )
        v_head = dv[3] if dv and len(dv) == 4 else None
    else:
        b = _first(*(d[0] for d in (dq, dk, dv) if d and len(d) == 3))
        hq, hkv = (qn or None), (kvn or None)
        s = dq[1] if dq and len(dq) == 3 else None
        length = _first(*(d[1] for d in (dk, dv) if d and len(d) == 3))
        head = _div(dq[2], qn) if dq and len(dq) == 3 else None
        head = _first(head, _div(dk[2], kvn) if dk and len(dk) == 3 else None)
        v_head = _div(dv[2], kvn) if dv and len(dv) == 3 else None
    past = dp[2] if dp is not None and len(dp) == 4 else (0 if types[4] is None else None)
    total = _plus(past, length)
    if rank == 4:
        y: tuple[Dim, ...] = (b, hq, s, v_head)
    else:
        y = (b, s, _mul(v_head, qn) if qn else None)
    shapes = [y, (b, hkv, total, head), (b, hkv, total, v_head), (b, hq, s, total)]
    sources = [q, k, v, q]
    for i in range(min(len(out), 4)):
        src = sources[i]
        if isinstance(src, TensorType):
            out[i] = TensorType(src.dtype, shapes[i])
    return out
