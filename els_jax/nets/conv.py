"""Stride-1 k×k convolutions of the networks, with a weight gradient that is fast on a CPU.

    y[b, h, w, o] = Σ_{i, j, c} x̃[b, h + i, w + j, c] · K[i, j, c, o] (+ bias[o])

x [B, H, W, C] (NHWC), K [k, k, C, O] (HWIO, k odd), y [B, H, W, O]; x̃ is x padded by
m = k // 2 on every side, with zeros ("zeros") or by wrapping around ("circular").

Why this module exists: XLA:CPU computes a convolution's forward pass and its input
gradient near matmul speed, but its weight gradient (the "backward filter" convolution,
contracting over B·H·W) 10–20× slower, which made one ResNet training step at 32×32 cost
minutes of CPU time (``experiments/bench_train.py`` measures all three side by side). So the
convolution carries a ``custom_vjp``:

  - forward and input gradient: ``lax.conv_general_dilated`` with symmetric zero padding
    (the fast case; a VALID convolution of a pre-padded input is 2–6× slower on XLA:CPU, so a
    circular convolution wraps the input by m, convolves with zero padding and crops);
  - weight gradient ∂L/∂K[i, j, c, o] = Σ_{b,h,w} x̃[b, h+i, w+j, c] · g[b, h, w, o]:
    on a CPU, im2col per chunk of images (the k² shifted windows side by side, one matmul
    [k²C, n]·[n, O] per chunk, chunks sized to stay in cache, accumulated by ``lax.scan``);
    on other backends XLA's own transpose (``lax.platform_dependent`` decides when the
    program is lowered, so one jitted function serves every backend).

A ``custom_vjp`` function cannot be differentiated in forward mode, and only training needs
weight gradients: ``fast_weight_grad=False`` gives the plain ``lax`` convolution (same
values, every transformation including ``jax.jvp``), which ``make_network`` uses for
sampling.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

__all__ = ["conv2d", "Conv", "weight_grad_reference", "PADDINGS"]

PADDINGS = ("zeros", "circular")
_DIMS = ("NHWC", "HWIO", "NHWC")
# Bytes of im2col windows per chunk in the CPU weight gradient: small enough to stay in the
# L2/L3 cache while the chunk's matmul reads it (measured: 2–5 MB beat 10–40 MB by 1.3–1.8×).
_CHUNK_BYTES = 2.5e6


def _conv_same(x, kernel):
    """Zero-padded ("same") stride-1 convolution through XLA."""
    m = kernel.shape[0] // 2
    return lax.conv_general_dilated(x, kernel, (1, 1), ((m, m), (m, m)),
                                     dimension_numbers=_DIMS)


def weight_grad_reference(x, g, k: int):
    """∂L/∂K of ``_conv_same`` by XLA's own transpose (the backward-filter convolution)."""
    kernel = jnp.zeros((k, k, x.shape[-1], g.shape[-1]), x.dtype)
    return jax.vjp(lambda kk: _conv_same(x, kk), kernel)[1](g)[0]


def _chunk_size(batch: int, bytes_per_image: float) -> int:
    """The largest divisor of ``batch`` whose windows fit in ``_CHUNK_BYTES`` (at least 1)."""
    c = max(1, min(batch, int(_CHUNK_BYTES // max(bytes_per_image, 1))))
    while batch % c:
        c -= 1
    return c


def _weight_grad_im2col(x, g, k: int):
    """∂L/∂K as im2col matmuls over chunks of images: [k²C, n]·[n, O] per chunk."""
    b, h, w, c = x.shape
    o = g.shape[-1]
    m = k // 2
    xp = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
    chunk = _chunk_size(b, h * w * k * k * c * x.dtype.itemsize)

    def body(acc, xs):
        xc, gc = xs
        windows = jnp.concatenate([xc[:, i:i + h, j:j + w, :]
                                   for i in range(k) for j in range(k)], axis=-1)
        return acc + windows.reshape(-1, k * k * c).T @ gc.reshape(-1, o), None

    xs = (xp.reshape(b // chunk, chunk, *xp.shape[1:]), g.reshape(b // chunk, chunk, h, w, o))
    acc, _ = lax.scan(body, jnp.zeros((k * k * c, o), jnp.float32), xs)
    return acc.reshape(k, k, c, o).astype(x.dtype)


@jax.custom_vjp
def _conv_same_fast(x, kernel):
    return _conv_same(x, kernel)


def _fwd(x, kernel):
    return _conv_same(x, kernel), (x, kernel)


def _bwd(residuals, g):
    x, kernel = residuals
    k = kernel.shape[0]
    # The input gradient is a forward convolution with the flipped kernel: fast everywhere.
    dx = jax.vjp(lambda xx: _conv_same(xx, kernel), x)[1](g)[0]
    dk = lax.platform_dependent(
        x, g, cpu=functools.partial(_weight_grad_im2col, k=k),
        default=functools.partial(weight_grad_reference, k=k))
    return dx, dk


_conv_same_fast.defvjp(_fwd, _bwd)


def conv2d(x: Float[Array, "b h w c"], kernel: Float[Array, "k k c o"], *,
           padding: str = "zeros", fast_weight_grad: bool = True) -> Float[Array, "b h w o"]:
    """Stride-1 k×k convolution that keeps H×W, zero or circular padding (module docstring).

    Args:
      x: [B, H, W, C] images (NHWC).
      kernel: [k, k, C, O], k odd.
      padding: "zeros" or "circular".
      fast_weight_grad: use the custom weight gradient (reverse mode only); False gives the
        plain XLA convolution, differentiable in every mode.
    Returns:
      [B, H, W, O].
    """
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of {PADDINGS}")
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"need x [B, H, W, C] and kernel [k, k, C, O]; got {x.shape} and "
                         f"{kernel.shape}")
    k = kernel.shape[0]
    if kernel.shape[1] != k or k % 2 == 0:
        raise ValueError(f"kernels must be square with an odd side; got {kernel.shape[:2]}")
    if kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel takes {kernel.shape[2]} channels; x has {x.shape[-1]}")
    conv = _conv_same_fast if fast_weight_grad else _conv_same
    if padding == "zeros":
        return conv(x, kernel)
    m = k // 2
    if m == 0:
        return conv(x, kernel)
    wrapped = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode="wrap")
    return conv(wrapped, kernel)[:, m:-m, m:-m, :]


class Conv(nn.Module):
    """Flax module for ``conv2d`` plus a bias; parameters named and initialised as
    ``flax.linen.Conv``'s (``kernel`` [k, k, C, O] LeCun normal, ``bias`` [O] zeros), so
    checkpoints of either load into the other."""

    features: int
    kernel_size: int = 3
    padding: str = "zeros"
    fast_weight_grad: bool = True

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        if k < 1 or k % 2 == 0:
            # An even kernel has no centre pixel: "same" padding would shift the image by
            # half a pixel and break the receptive-field and equivariance statements.
            raise ValueError(f"kernel sizes must be odd and positive; got {k}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = conv2d(x, kernel, padding=self.padding, fast_weight_grad=self.fast_weight_grad)
        return y + bias[None, None, None, :]
