"""Binary inference: XNOR + popcount over bit-packed operands (numba JIT).

For ``a, b ∈ {−1, +1}^K`` packed as bits (1 = +1, LSB first in 64-bit words,
padding bits 0 in both), ``a·b = K − 2·popcount(a XOR b)`` (XNOR-Net,
Rastegari et al. 2016, Eq. 6): one XOR + one popcount covers 64
multiply-accumulates. :func:`binary_matmul` computes the exact integer
product; :class:`BinaryDense` runs a trained binary-weight, binary-input
``QuantDense`` (sign/BWN kernel, sign inputs) with it. numba (``pip install
'kquant[deploy]'``) compiles the kernel for this CPU's ``popcnt``.
"""

from __future__ import annotations

import numpy as np

from kquant.deploy.runtimes import require

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        numba = require("numba", "The XNOR/popcount kernel")
        from numba import types
        from numba.extending import intrinsic

        @intrinsic
        def popcount(typingctx, x):
            def codegen(context, builder, signature, args):
                return builder.ctpop(args[0])

            return types.uint64(types.uint64), codegen

        @numba.njit(parallel=True, fastmath=True, cache=False)
        def matmul(a, b, k):
            m, words = a.shape
            n = b.shape[0]
            out = np.empty((m, n), np.int32)
            for j in numba.prange(n):  # output columns in parallel: batch 1 uses every core
                for i in range(m):
                    count = 0
                    for w in range(words):
                        count += popcount(a[i, w] ^ b[j, w])
                    out[i, j] = k - 2 * count
            return out

        _KERNEL = matmul
    return _KERNEL


def pack_signs(x):
    """``[..., K]`` floats → ``[..., ceil(K/64)]`` uint64 words, bit 1 where ``x ≥ 0``."""
    x = np.asarray(x)
    k = x.shape[-1]
    words = -(-k // 64)
    bits = np.zeros(x.shape[:-1] + (words * 64,), np.uint8)
    bits[..., :k] = x >= 0
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint64)


def binary_matmul(a_words, b_words, k):
    """Exact ``sign(A) · sign(B)ᵀ`` (int32 ``[M, N]``) from packed rows ``[M, W]``, ``[N, W]``."""
    a_words = np.ascontiguousarray(a_words, np.uint64)
    b_words = np.ascontiguousarray(b_words, np.uint64)
    if a_words.shape[1] != b_words.shape[1] or a_words.shape[1] != -(-int(k) // 64):
        raise ValueError(f"packed operands must both have ceil(k/64) = {-(-int(k) // 64)} words, "
                         f"got {a_words.shape[1]} and {b_words.shape[1]}.")
    return _kernel()(a_words, b_words, np.int32(k))


class BinaryDense:
    """``y = (sign(x) · sign(W)) ⊙ scale + b`` for a binary ``QuantDense`` (inference only)."""

    def __init__(self, layer):
        from keras import ops

        from kquant.quantizers.sign import BWN, Sign

        kq, iq = layer.kernel_quantizer, layer.input_quantizer
        if not isinstance(kq, (Sign, BWN)) or type(iq) is not Sign:
            raise ValueError(f"BinaryDense needs a sign/BWN `kernel_quantizer` and a sign "
                             f"`input_quantizer`; layer {layer.name!r} has "
                             f"{type(kq).__name__} and {type(iq).__name__}.")
        kernel = np.asarray(ops.convert_to_numpy(layer.quantized_kernel(training=False)))
        self.k = kernel.shape[0]
        self.weights = pack_signs(kernel.T)               # [N, W]
        self.scale = np.abs(kernel).max(axis=0).astype(np.float32)  # ±scale per column
        self.bias = (np.zeros(kernel.shape[1], np.float32) if layer.bias is None
                     else np.asarray(ops.convert_to_numpy(layer.bias), np.float32))
        self.activation = layer.activation

    def __call__(self, x):
        counts = binary_matmul(pack_signs(x), self.weights, self.k)
        return counts.astype(np.float32) * self.scale + self.bias
