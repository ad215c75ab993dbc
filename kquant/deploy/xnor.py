"""Binary inference: XNOR + popcount over bit-packed operands (numba JIT).

For ``a, b ∈ {−1, +1}^K`` packed as bits (1 = +1, LSB first in 64-bit words,
padding bits 0 in both), ``a·b = K − 2·popcount(a XOR b)`` (XNOR-Net,
Rastegari et al. 2016, Eq. 6): one XOR + one popcount covers 64
multiply-accumulates. :func:`binary_matmul` computes the exact integer
product; :class:`BinaryDense` runs a trained binary-weight, binary-input
``QuantDense`` (sign/BWN kernel, sign inputs) with it. Convolutions go
through an implicit im2col (:func:`binary_conv2d`, :class:`BinaryConv2D`):
each pixel's ``C`` channels are packed once into ``ceil(C/64)`` words, an
output pixel's ``kh·kw`` window of pixel words is gathered into one packed
row and XOR/popcounted against each filter's. Zero padding has no ±1 code:
in a window that crosses the border the padded words are masked out,
``a·b = K_valid − 2·popcount((a XOR b) AND m)`` with ``K_valid = C·(pixels
inside)``, so it counts 0 exactly, as in the float convolution. numba
(``pip install 'kquant[deploy]'``) compiles the kernels for this CPU's ``popcnt``.
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

        @numba.njit(parallel=True, fastmath=True, cache=False)
        def conv(x, b, kh, kw, strides, pads, channels):
            batch, height, width, words = x.shape
            filters, length = b.shape
            sh, sw = strides
            top, left = pads[0], pads[1]
            oh = (height + pads[0] + pads[2] - kh) // sh + 1
            ow = (width + pads[1] + pads[3] - kw) // sw + 1
            out = np.empty((batch, oh, ow, filters), np.int32)
            full = ~np.uint64(0)
            for p in numba.prange(batch * oh * ow):  # output pixels in parallel
                n, i, j = p // (oh * ow), (p // ow) % oh, p % ow
                window = np.zeros(length, np.uint64)  # this pixel's im2col row, packed
                mask = np.zeros(length, np.uint64)
                valid, t = 0, 0
                for u in range(kh):
                    y = i * sh + u - top
                    for v in range(kw):
                        z = j * sw + v - left
                        inside = 0 <= y < height and 0 <= z < width
                        if inside:
                            valid += channels
                        for w in range(words):
                            if inside:
                                window[t] = x[n, y, z, w]
                                mask[t] = full
                            t += 1
                for f in range(filters):
                    count = 0
                    if valid == kh * kw * channels:  # no padding in the window
                        for t in range(length):
                            count += popcount(window[t] ^ b[f, t])
                    else:  # zero padding has no ±1 code: masked out, counts 0
                        for t in range(length):
                            count += popcount((window[t] ^ b[f, t]) & mask[t])
                    out[n, i, j, f] = valid - 2 * count
            return out

        _KERNEL = (matmul, conv)
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
    return _kernel()[0](a_words, b_words, np.int32(k))


def _binary_layer(layer, kind):
    """``(float kernel, scale per output, bias)`` of a sign/BWN-kernel, sign-input layer,
    or a ``ValueError`` naming the layer and what it has."""
    from keras import ops

    from kquant.quantizers.sign import BWN, Sign

    kq, iq = layer.kernel_quantizer, layer.input_quantizer
    if not isinstance(kq, (Sign, BWN)) or type(iq) is not Sign:
        raise ValueError(f"{kind} needs a sign/BWN `kernel_quantizer` and a sign "
                         f"`input_quantizer`; layer {layer.name!r} has "
                         f"{type(kq).__name__} and {type(iq).__name__}.")
    kernel = np.asarray(ops.convert_to_numpy(layer.quantized_kernel(training=False)))
    scale = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0).astype(np.float32)
    bias = (np.zeros(kernel.shape[-1], np.float32) if layer.bias is None
            else np.asarray(ops.convert_to_numpy(layer.bias), np.float32))
    return kernel, scale, bias


class BinaryDense:
    """``y = (sign(x) · sign(W)) ⊙ scale + b`` for a binary ``QuantDense`` (inference only)."""

    def __init__(self, layer):
        kernel, self.scale, self.bias = _binary_layer(layer, "BinaryDense")
        self.k = kernel.shape[0]
        self.weights = pack_signs(kernel.T)               # [N, W]
        self.activation = layer.activation

    def __call__(self, x):
        counts = binary_matmul(pack_signs(x), self.weights, self.k)
        return counts.astype(np.float32) * self.scale + self.bias


def _same_padding(size, kernel, stride):
    """``(before, after)`` zero padding of Keras' ``"same"`` (TensorFlow's rule)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def im2col(x, kernel_size, strides, padding):
    """im2col of ``x`` ``[B, H, W, C]``: ``[B, OH, OW, kh·kw·C]`` in the kernel's
    ``(kh, kw, C)`` order, zero padded as Keras' ``"same"``/``"valid"``."""
    (kh, kw), (sh, sw) = kernel_size, strides
    if padding == "same":
        (t, b), (l, r) = _same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw)
        x = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::sh, ::sw]                      # [B, OH, OW, C, kh, kw]
    windows = np.moveaxis(windows, 3, -1)                 # [B, OH, OW, kh, kw, C]
    return windows.reshape(windows.shape[:3] + (-1,))


def binary_conv2d(x, w_words, strides=(1, 1), padding="valid"):
    """Exact integer ``conv2d(sign(x), sign(W))`` (channels_last, zero padding, int32
    ``[B, OH, OW, F]``) from ``x`` ``[B, H, W, C]`` floats and the kernel packed by
    :func:`pack_conv_kernel` (``[F, kh, kw, ceil(C/64)]`` words)."""
    x = np.asarray(x)
    if padding not in ("same", "valid"):
        raise ValueError(f"`padding` must be 'same' or 'valid', got {padding!r}.")
    w_words = np.ascontiguousarray(w_words, np.uint64)
    if w_words.ndim != 4 or w_words.shape[3] != -(-x.shape[-1] // 64):
        raise ValueError(f"the packed kernel {w_words.shape} does not fit {x.shape[-1]} input "
                         f"channels ([F, kh, kw, {-(-x.shape[-1] // 64)}] words expected).")
    (kh, kw), (sh, sw) = w_words.shape[1:3], strides
    pads = (0, 0, 0, 0)
    if padding == "same":
        (t, b), (l, r) = _same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw)
        pads = (t, l, b, r)
    filters = w_words.shape[0]
    return _kernel()[1](pack_signs(x), np.ascontiguousarray(w_words.reshape(filters, -1)),
                        int(kh), int(kw), (int(sh), int(sw)), pads, int(x.shape[-1]))


def pack_conv_kernel(kernel):
    """``[kh, kw, C, F]`` → ``[F, kh, kw, ceil(C/64)]`` uint64 sign words (1 where ≥ 0)."""
    kernel = np.asarray(kernel)
    return pack_signs(np.transpose(kernel, (3, 0, 1, 2)))


class BinaryConv2D:
    """``y = conv(sign(x), sign(W)) ⊙ scale + b`` for a binary ``QuantConv2D``
    (channels_last, no dilation or groups; inference only)."""

    def __init__(self, layer):
        if layer.data_format != "channels_last" or tuple(layer.dilation_rate) != (1, 1) \
                or getattr(layer, "groups", 1) != 1:
            raise ValueError(f"BinaryConv2D supports channels_last, dilation 1, groups 1; "
                             f"layer {layer.name!r} differs.")
        kernel, self.scale, self.bias = _binary_layer(layer, "BinaryConv2D")
        self.strides = tuple(layer.strides)
        self.padding = layer.padding
        self.weights = pack_conv_kernel(kernel)

    def __call__(self, x):
        counts = binary_conv2d(x, self.weights, self.strides, self.padding)
        return counts.astype(np.float32) * self.scale + self.bias
