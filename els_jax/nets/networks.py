"""The convolutional denoisers of the paper (docs/theory.md §5), as pure Flax Linen modules.

Every network predicts the noise of the variance-preserving forward process,

    ε̂ = model.apply(params, x, t, label)       → [B, H, W, C]

with x [B, H, W, C] float32 (NHWC), t [B] or a scalar in [0, 1], label [B] int or None, so
that, through ``make_network``, a trained network is one more ``eps_fn(x, t, i)`` for the
single sampler ``els_jax.sample`` that also drives the analytic machines (docs/theory.md §3).

Networks:
  - ``ResNet``: 3×3 conv up-projection to ``channels``, ``depth`` residual layers
    h ← h + ReLU(conv(h) + W_l·e(t, y)), 3×3 conv down-projection; no normalisation.
    Receptive field 1 + Σ (k − 1) over its convs = 17 for the paper's 8 convs of size 3.
  - ``UNet``: one block (``convs_per_block`` conv+ReLU, the embedding added once per block)
    per scale, 2×2 max-pool down, 2×2 stride-2 transposed conv up, skip connections by
    concatenation; optional multi-head self-attention at chosen resolutions.

Both take ``padding``: "zeros" (the paper's default; breaks translation equivariance at the
border, which is what makes the boundary-broken ELS machine the right model) or "circular"
(wrap-around; the network then commutes with circular shifts).

The embedding e(t, y) = MLP(sinusoid(t) + E[y]) is the sinusoidal time embedding plus, for a
class-conditional network (``num_classes`` set), a learned class embedding E[y] of the same
width (docs/theory.md §5).

    >>> model = ResNet(channels=64, depth=6)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
    >>> eps_hat = model.apply(params, x, t)               # [B, 8, 8, 1]
    >>> x0 = els_jax.sample(make_network(model, params), x_T)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from els_jax.nets.conv import Conv

__all__ = ["ResNet", "UNet", "ARCHS", "PADDINGS", "make_network", "receptive_field",
           "sinusoidal_embedding", "TimeClassEmbedding"]

# Network padding names ("zeros" is the paper's default). Both are implemented by
# ``els_jax.conv``: the same convolution as flax's symmetric-zero / CIRCULAR padding, with a
# weight gradient that is fast on a CPU.
PADDINGS = {"zeros": "zeros", "circular": "circular"}


def _check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of {sorted(PADDINGS)}")
    return padding


def _conv(features: int, kernel_size: int, padding: str, fast_weight_grad: bool,
          name: str | None = None) -> Conv:
    """A k×k stride-1 convolution that keeps H×W, with zero or circular padding."""
    return Conv(features, kernel_size, padding=padding, fast_weight_grad=fast_weight_grad,
                name=name)


def sinusoidal_embedding(t: Float[Array, " b"], dim: int, *, scale: float = 1000.0,
                         max_period: float = 10000.0) -> Float[Array, "b dim"]:
    """Transformer-style embedding of times t ∈ [0, 1]:

        e = [sin(s·t·ω_0), …, sin(s·t·ω_{d/2−1}), cos(s·t·ω_0), …],
        ω_j = P^{−j/(d/2)},

    with s = ``scale`` (so that t·s spans the usual 0…1000 range of discrete-time models) and
    P = ``max_period``. ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"embedding dimension must be even; got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeClassEmbedding(nn.Module):
    """e(t, y) = Dense(SiLU(Dense(sinusoid(t) + E[y]))), [B] → [B, dim].

    E is a learned table [num_classes, dim], used only when ``num_classes`` is set.
    """

    dim: int = 128
    num_classes: int | None = None

    @nn.compact
    def __call__(self, t, label=None):
        e = sinusoidal_embedding(t, self.dim)
        if self.num_classes is not None:
            e = e + nn.Embed(self.num_classes, self.dim, name="class_embedding")(label)
        e = nn.Dense(self.dim)(e)
        return nn.Dense(self.dim)(nn.silu(e))


def _check_inputs(x, t, label, num_classes):
    """Validates and normalises (x, t, label): x [B,H,W,C] f32, t [B] f32, label [B] int32."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch [B, H, W, C] (NHWC); got shape {x.shape}")
    x = x.astype(jnp.float32)
    b = x.shape[0]
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
        raise ValueError(f"t must be a scalar or one time per image, shape ({b},); got {t.shape}")
    if num_classes is None:
        if label is not None:
            raise ValueError("this network is unconditional (num_classes=None) but a label was "
                             "given; build it with num_classes=... to condition on labels")
        return x, t, None
    if label is None:
        raise ValueError(f"this network is class-conditional (num_classes={num_classes}); "
                         "pass label=[B] ints")
    label = jnp.asarray(label)
    if not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"labels must be integers; got dtype {label.dtype}")
    if label.ndim == 0:
        label = jnp.broadcast_to(label, (b,))
    if label.shape != (b,):
        raise ValueError(f"label must be a scalar or one label per image, shape ({b},); "
                         f"got {label.shape}")
    return x, t, label.astype(jnp.int32)


def _add_embedding(h, e, name=None):
    """h [B,H,W,c] + W·e [B,c] broadcast over pixels (the same shift at every pixel)."""
    proj = nn.Dense(h.shape[-1], name=name)(e)
    return h + proj[:, None, None, :]


class ResNet(nn.Module):
    """The paper's local denoiser: no pooling, so its receptive field stays small.

        h_0     = Conv_{k_io}(x)                                    [B, H, W, channels]
        h_{l+1} = h_l + ReLU(Conv_k(h_l) + W_l·e(t, y)),  l < depth
        ε̂       = Conv_{k_io}(h_depth)                              [B, H, W, C]

    Attributes:
      channels: width of the hidden layers (paper: 256).
      depth: number of residual layers (paper: 6).
      kernel_size: kernel of the residual convs (3).
      io_kernel_size: kernel of the up- and down-projections (3; paper's receptive field 17).
      padding: "zeros" or "circular", for every conv.
      num_classes: None (unconditional) or the number of classes of the conditioning label.
      emb_dim: width of the time (and class) embedding.
      out_channels: channels of ε̂ (default: those of x).
      fast_weight_grad: convolutions with the CPU-fast weight gradient (``els_jax.conv``;
        reverse mode only). ``make_network`` turns it off, so a sampled network supports
        ``jax.jvp`` too; the parameters are the same either way.
    """

    channels: int = 256
    depth: int = 6
    kernel_size: int = 3
    io_kernel_size: int = 3
    padding: str = "zeros"
    num_classes: int | None = None
    emb_dim: int = 128
    out_channels: int | None = None
    fast_weight_grad: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], t, label: Int[Array, " b"] | None = None
                 ) -> Float[Array, "b h w c"]:
        padding = _check_padding(self.padding)
        if self.depth < 0 or self.channels < 1:
            raise ValueError(f"need depth ≥ 0 and channels ≥ 1; got depth={self.depth}, "
                             f"channels={self.channels}")
        x, t, label = _check_inputs(x, t, label, self.num_classes)
        e = TimeClassEmbedding(self.emb_dim, self.num_classes, name="embedding")(t, label)
        h = _conv(self.channels, self.io_kernel_size, padding, self.fast_weight_grad,
                  name="up")(x)
        for layer in range(self.depth):
            z = _conv(self.channels, self.kernel_size, padding, self.fast_weight_grad,
                      name=f"conv_{layer}")(h)
            # The embedding enters after the conv, so it is the same at every pixel (also at
            # the border of a zero-padded net) and cannot widen the receptive field.
            h = h + nn.relu(_add_embedding(z, e, name=f"emb_{layer}"))
        out = self.out_channels or x.shape[-1]
        return _conv(out, self.io_kernel_size, padding, self.fast_weight_grad,
                     name="down")(h)


class UNet(nn.Module):
    """The paper's UNet: 3 scales (64/128/256 channels) by default, no normalisation.

    Per scale s (resolution H/2^s), one block of ``convs_per_block`` ×
    [Conv_k → (+ W·e(t, y) after the block's first conv) → ReLU]; encoder blocks are followed
    by a 2×2 max-pool, decoder blocks are preceded by a 2×2 stride-2 transposed conv and a
    concatenation with the encoder output at the same scale (skip connection):

        enc_s = Block_s(pool(enc_{s−1})),   dec_s = Block_s([ConvT(dec_{s+1}), enc_s]),
        ε̂ = Conv_k(dec_0)

    With ``attention_resolutions`` (spatial sizes, e.g. (8,) for 32×32 inputs), a residual
    multi-head self-attention layer h ← h + MHA(h) over all pixels follows every block at
    those resolutions; its receptive field is then the whole image.

    H and W must be divisible by 2^(len(channels) − 1), so that pooling never drops pixels
    (with circular padding the net then commutes with shifts by multiples of that factor).

    Attributes:
      channels: widths per scale, from the finest (paper: (64, 128, 256)).
      convs_per_block: conv+ReLU layers per block (2).
      kernel_size: kernel of every conv (3).
      padding: "zeros" or "circular", for every k×k conv (pooling and the 2×2 stride-2
        transposed conv tile the image exactly and need none).
      num_classes, emb_dim, out_channels: as for ``ResNet``.
      attention_resolutions: spatial sizes at which to add self-attention.
      num_heads: attention heads (must divide the channels of those scales).
      fast_weight_grad: as for ``ResNet``.
    """

    channels: Sequence[int] = (64, 128, 256)
    convs_per_block: int = 2
    kernel_size: int = 3
    padding: str = "zeros"
    num_classes: int | None = None
    emb_dim: int = 128
    out_channels: int | None = None
    attention_resolutions: Sequence[int] = ()
    num_heads: int = 4
    fast_weight_grad: bool = True

    def _block(self, h, e, features, name):
        for j in range(self.convs_per_block):
            h = _conv(features, self.kernel_size, self.padding, self.fast_weight_grad,
                      name=f"{name}_conv{j}")(h)
            if j == 0:
                h = _add_embedding(h, e, name=f"{name}_emb")
            h = nn.relu(h)
        if h.shape[1] in self.attention_resolutions:
            if features % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} must divide the {features} "
                                 f"channels of the attention layer at resolution {h.shape[1]}")
            b, hh, ww, c = h.shape
            flat = h.reshape(b, hh * ww, c)
            att = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                                  name=f"{name}_attention")(flat)
            h = h + att.reshape(b, hh, ww, c)
        return h

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], t, label: Int[Array, " b"] | None = None
                 ) -> Float[Array, "b h w c"]:
        _check_padding(self.padding)
        channels = tuple(int(c) for c in self.channels)
        if not channels or min(channels) < 1 or self.convs_per_block < 1:
            raise ValueError(f"need ≥ 1 scale of positive width and ≥ 1 conv per block; got "
                             f"channels={self.channels}, convs_per_block={self.convs_per_block}")
        x, t, label = _check_inputs(x, t, label, self.num_classes)
        factor = 2 ** (len(channels) - 1)
        _, height, width, c_in = x.shape
        if height % factor or width % factor:
            raise ValueError(f"a {len(channels)}-scale UNet needs H and W divisible by "
                             f"{factor}; got {height}×{width} (resize the data, e.g. "
                             "image_size=16 for the 8×8 digits is fine, 28×28 MNIST is not)")
        resolutions = [height // 2**s for s in range(len(channels))]
        unknown = sorted(set(self.attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} are not among this UNet's "
                             f"resolutions {resolutions} for {height}×{width} inputs")

        e = TimeClassEmbedding(self.emb_dim, self.num_classes, name="embedding")(t, label)
        skips = []
        h = x
        for s, features in enumerate(channels):
            if s > 0:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            h = self._block(h, e, features, name=f"down{s}")
            skips.append(h)
        for s in reversed(range(len(channels) - 1)):
            h = nn.ConvTranspose(channels[s], (2, 2), strides=(2, 2), padding="VALID",
                                 name=f"upsample{s}")(h)
            h = jnp.concatenate([h, skips[s]], axis=-1)
            h = self._block(h, e, channels[s], name=f"up{s}")
        out = self.out_channels or c_in
        return _conv(out, self.kernel_size, self.padding, self.fast_weight_grad,
                     name="out")(h)


# Architecture name → module class (a literal dict, no registry).
ARCHS = {"resnet": ResNet, "unet": UNet}


def receptive_field(model: nn.Module) -> int | None:
    """Side of the square window of input pixels that can affect one output pixel.

    Computed from the module's actual kernel sizes. For the ResNet (stride 1 everywhere) it is
    the same at every interior pixel:

        r = 1 + 2·(k_io − 1) + depth·(k − 1)          (= 17 for the paper's ResNet)

    For the UNet the window depends on where a pixel sits in the pooling grid, so the support
    of one output pixel is propagated backwards exactly, one axis at a time (every layer acts
    separably on the support): a k×k conv widens an interval [lo, hi] by k//2 on each side, a
    2×2 max-pool maps coarse [lo, hi] to fine [2·lo, 2·hi + 1], a 2×2 stride-2 transposed
    conv maps fine [lo, hi] to coarse [⌊lo/2⌋, ⌊hi/2⌋], and a skip connection takes the hull
    of both paths. The result is the largest window over the 2^(scales−1) pixel phases (a
    border pixel of a zero-padded net sees less). Returns None when self-attention makes the
    receptive field the whole image.
    """
    if isinstance(model, ResNet):
        return 1 + 2 * (model.io_kernel_size - 1) + model.depth * (model.kernel_size - 1)
    if isinstance(model, UNet):
        if model.attention_resolutions:
            return None
        n = len(model.channels)
        m = model.kernel_size // 2
        widen = model.convs_per_block * m  # one block of convs, per side

        def encoder_support(s, lo, hi):
            """Input interval feeding the output interval [lo, hi] of encoder block s."""
            lo, hi = lo - widen, hi + widen
            if s == 0:
                return lo, hi
            return encoder_support(s - 1, 2 * lo, 2 * hi + 1)  # through the max-pool

        def decoder_support(s, lo, hi):
            """Input interval feeding the output interval [lo, hi] of decoder block s."""
            if s == n - 1:  # the coarsest block is the bottom of the encoder
                return encoder_support(s, lo, hi)
            lo, hi = lo - widen, hi + widen
            skip = encoder_support(s, lo, hi)
            up = decoder_support(s + 1, lo // 2, hi // 2)  # through the transposed conv
            return min(skip[0], up[0]), max(skip[1], up[1])

        widths = []
        for p in range(2 ** (n - 1)):
            lo, hi = decoder_support(0, p - m, p + m)  # the output conv first
            widths.append(hi - lo + 1)
        return max(widths)
    raise TypeError(f"receptive_field knows ResNet and UNet; got {type(model).__name__}")


def make_network(model: nn.Module, params, *, label=None) -> Callable:
    """Wraps a trained ε-network as ``eps_fn(x, t, i)`` for ``els_jax.sample``.

    Args:
      model: a ResNet or UNet (any module with ``apply(params, x, t, label)``).
      params: its variables (the dict returned by ``model.init``, e.g. from ``load_trained``).
      label: for a class-conditional network, one int (used for the whole batch) or [B] ints.
    Returns:
      eps_fn(x [B,H,W,C], t scalar, i int) -> ε̂ [B,H,W,C]. The step index i is ignored (a
      network has no per-step patch size). ``model.apply`` is jitted once here, so every call
      with the same shapes reuses one compilation.

        >>> x0 = els_jax.sample(make_network(model, params, label=3), x_T, uniform_times(150))
    """
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and label is None:
        raise ValueError(f"the network is class-conditional (num_classes={num_classes}); "
                         "pass label=... to make_network")
    if num_classes is None and label is not None:
        raise ValueError("the network is unconditional; do not pass a label")
    label_array = None if label is None else jnp.asarray(label, jnp.int32)
    if label_array is not None and not (0 <= int(label_array.min()) and
                                        int(label_array.max()) < num_classes):
        # Inside jit an out-of-range index into the class table is silently clamped.
        raise ValueError(f"labels must lie in [0, {num_classes}); got {label}")
    if getattr(model, "fast_weight_grad", False):
        # Sampling needs no weight gradients: the plain XLA convolutions (same values) keep
        # eps_fn differentiable in every mode, jax.jvp included.
        model = model.clone(fast_weight_grad=False)
    apply = jax.jit(model.apply)

    def eps_fn(x, t, i=None):
        del i  # one network for all steps
        b = x.shape[0]
        t_batch = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        if label_array is None:
            return apply(params, x, t_batch)
        if label_array.ndim not in (0, 1) or (label_array.ndim == 1 and label_array.shape[0] != b):
            raise ValueError(f"label must be one int or [{b}] ints; got shape {label_array.shape}")
        return apply(params, x, t_batch, jnp.broadcast_to(label_array, (b,)))

    return eps_fn
