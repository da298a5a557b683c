"""The networks (docs/theory.md §5): shapes, translation equivariance under circular padding, locality
(receptive field) under zero padding, conditioning, input checks, and make_network + sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.nets.networks import ResNet, UNet, make_network, receptive_field

KEY = jax.random.key(0)


def _random_params(model, *args, seed=0):
    """Random parameters of the right shapes, without running ``model.init``.

    Every property tested here holds for any parameters, and flax's initialisers (truncated
    normals, one per tensor) cost seconds of XLA compilation per model on CPU.
    """
    shapes = jax.eval_shape(model.init, KEY, *args)
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    # Kernels ~ N(0, 1/fan_in) (fan_in = all but the last axis), biases and tables ~ N(0, 0.1²).
    values = [rng.normal(size=s.shape) * (np.prod(s.shape[:-1]) ** -0.5 if len(s.shape) > 1
                                          else 0.1) for s in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])


def _init(model, size=8, channels=1, conditional=False):
    x = jax.random.normal(jax.random.key(1), (2, size, size, channels), jnp.float32)
    t = jnp.array([0.3, 0.8], jnp.float32)
    label = jnp.array([1, 2], jnp.int32) if conditional else None
    return _random_params(model, x, t, label), x, t, label


VARIANTS = {
    "resnet-zeros": (ResNet(channels=8, depth=2), 8, False),
    "resnet-circular-cond": (ResNet(channels=8, depth=2, padding="circular", num_classes=3),
                             8, True),
    "unet-zeros": (UNet(channels=(4, 8, 8)), 8, False),
    "unet-circular-cond": (UNet(channels=(4, 8), padding="circular", num_classes=3), 8, True),
    "unet-attention-cond": (UNet(channels=(4, 8, 8), attention_resolutions=(4, 2), num_heads=2,
                                 num_classes=3), 8, True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_maps_nhwc_to_finite_eps_of_the_same_shape_that_depends_on_t(name):
    model, size, conditional = VARIANTS[name]
    params, x, t, label = _init(model, size, channels=3, conditional=conditional)
    apply = jax.jit(model.apply)
    out = apply(params, x, t, label)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    # The time embedding reaches the output: other times, other ε̂.
    out_t = apply(params, x, t[::-1], label)
    assert float(jnp.max(jnp.abs(out - out_t))) > 1e-4
    # A scalar t means the same time for the whole batch.
    np.testing.assert_allclose(apply(params, x, jnp.float32(0.3), label),
                               apply(params, x, jnp.full((2,), 0.3), label), atol=1e-6)


@pytest.mark.parametrize("shift", [(1, 0), (3, -2), (5, 7)])
def test_circular_resnet_commutes_with_roll(shift):
    model = ResNet(channels=8, depth=3, padding="circular")
    params, x, t, _ = _init(model, size=8)
    apply = jax.jit(model.apply)
    rolled_in = apply(params, jnp.roll(x, shift, axis=(1, 2)), t)
    rolled_out = jnp.roll(apply(params, x, t), shift, axis=(1, 2))
    np.testing.assert_allclose(rolled_in, rolled_out, atol=1e-5)


def test_zero_padded_resnet_is_not_shift_equivariant():
    # The control for the test above: zero padding breaks equivariance at the border.
    model = ResNet(channels=8, depth=3, padding="zeros")
    params, x, t, _ = _init(model, size=8)
    apply = jax.jit(model.apply)
    rolled_in = apply(params, jnp.roll(x, 1, axis=1), t)
    rolled_out = jnp.roll(apply(params, x, t), 1, axis=1)
    assert float(jnp.max(jnp.abs(rolled_in - rolled_out))) > 1e-3


@pytest.mark.parametrize("attention", [(), (4,)])
def test_circular_unet_commutes_with_roll_by_the_pooling_period(attention):
    # Two poolings: the net is equivariant to shifts by multiples of 4 (attention without
    # positional encodings is permutation-equivariant, so it keeps the property).
    model = UNet(channels=(4, 8, 8), padding="circular", attention_resolutions=attention,
                 num_heads=2)
    params, x, t, _ = _init(model, size=8)
    apply = jax.jit(model.apply)
    shift = (4, -4)
    np.testing.assert_allclose(apply(params, jnp.roll(x, shift, axis=(1, 2)), t),
                               jnp.roll(apply(params, x, t), shift, axis=(1, 2)), atol=1e-5)


def _support(model, params, x, t, pixels):
    """Boolean [P, H, W]: which input pixels the output at each of ``pixels`` depends on."""
    masks = np.zeros((len(pixels),) + x.shape[1:3] + (1,), np.float32)
    for n, (i, j) in enumerate(pixels):
        masks[n, i, j] = 1.0

    @jax.jit
    def grads(masks):
        one = lambda m: jax.grad(lambda x: jnp.sum(model.apply(params, x, t)[0] * m))(x)[0]
        return jax.vmap(one)(masks)

    return np.any(np.asarray(grads(jnp.asarray(masks))) != 0.0, axis=-1)


def _box(support):
    rows, cols = np.nonzero(support)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_resnet_receptive_field_formula():
    assert receptive_field(ResNet()) == 17  # the paper's network: 8 convs of size 3
    assert receptive_field(ResNet(depth=2)) == 9
    assert receptive_field(ResNet(depth=1, kernel_size=5, io_kernel_size=1)) == 5


@pytest.mark.parametrize("model", [ResNet(channels=8, depth=6),
                                   ResNet(channels=8, depth=2, kernel_size=5)])
def test_zero_padded_resnet_output_depends_exactly_on_its_receptive_field(model):
    size = 24
    r = receptive_field(model)
    m = r // 2
    x = jax.random.normal(jax.random.key(2), (1, size, size, 1), jnp.float32)
    t = jnp.full((1,), 0.5)
    params = _random_params(model, x, t)
    pixels = [(12, 12), (0, 3), (20, 9)]
    support = _support(model, params, x, t, pixels)
    for (i, j), s in zip(pixels, support):
        window = np.zeros((size, size), bool)
        window[max(i - m, 0):i + m + 1, max(j - m, 0):j + m + 1] = True
        assert not np.any(s & ~window), "depends on inputs outside the receptive field"
        # ... and on inputs as far out as the window reaches (its whole bounding box).
        assert _box(s) == _box(window)
    # The interior pixel sees the full r×r window.
    assert support[0].sum() == r * r


def test_unet_receptive_field_is_the_largest_support_over_pooling_phases():
    model = UNet(channels=(4, 4, 4))
    size = 64
    x = jax.random.normal(jax.random.key(2), (1, size, size, 1), jnp.float32)
    t = jnp.full((1,), 0.5)
    params = _random_params(model, x, t)
    # The 4 phases of the pooling grid along the diagonal, far from the border.
    pixels = [(28 + p, 28 + p) for p in range(4)]
    widths = [b - a + 1 for a, b, _, _ in map(_box, _support(model, params, x, t, pixels))]
    assert max(widths) == receptive_field(model) == 48
    assert receptive_field(UNet(attention_resolutions=(8,))) is None


def test_conditional_output_depends_on_the_label():
    for model in (ResNet(channels=8, depth=2, num_classes=4), UNet(channels=(4, 8), num_classes=4)):
        params, x, t, _ = _init(model, conditional=True)
        apply = jax.jit(model.apply)
        out0 = apply(params, x, t, jnp.array([0, 0]))
        out1 = apply(params, x, t, jnp.array([1, 1]))
        assert float(jnp.max(jnp.abs(out0 - out1))) > 1e-4
        # A scalar label is used for the whole batch.
        np.testing.assert_allclose(apply(params, x, t, 1), out1, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    # The checks run while tracing: eval_shape finds them without computing anything.
    trace = lambda model, *args: jax.eval_shape(model.init, KEY, *args)
    with pytest.raises(ValueError, match="unknown padding"):
        trace(ResNet(channels=4, depth=1, padding="reflect"), x, t)
    with pytest.raises(ValueError, match="divisible by 4"):
        trace(UNet(channels=(4, 4, 4)), jnp.zeros((1, 6, 6, 1)), t)
    with pytest.raises(ValueError, match="attention_resolutions"):
        trace(UNet(channels=(4, 4, 4), attention_resolutions=(3,)), x, t)
    with pytest.raises(ValueError, match="num_heads"):
        trace(UNet(channels=(4, 6), attention_resolutions=(4,), num_heads=4), x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        trace(ResNet(channels=4, depth=1, num_classes=3), x, t)
    with pytest.raises(ValueError, match="unconditional"):
        trace(ResNet(channels=4, depth=1), x, t, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        trace(ResNet(channels=4, depth=1), jnp.zeros((8, 8, 1)), t)
    with pytest.raises(ValueError, match="one time per image"):
        trace(ResNet(channels=4, depth=1), x, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="odd"):
        trace(ResNet(channels=4, depth=1, kernel_size=2), x, t)
    with pytest.raises(TypeError, match="receptive_field"):
        receptive_field(object())


def test_make_network_drives_the_shared_sampler():
    model = ResNet(channels=8, depth=2, num_classes=3)
    params, x, _, _ = _init(model, conditional=True)
    eps_fn = make_network(model, params, label=2)
    t = jnp.float32(0.4)
    want = jax.jit(model.apply)(params, x, jnp.full((2,), 0.4), jnp.array([2, 2]))
    np.testing.assert_allclose(eps_fn(x, t, 0), want, atol=1e-6)
    x0 = ej.sample(eps_fn, x, ej.uniform_times(3))
    assert x0.shape == x.shape and np.all(np.isfinite(np.asarray(x0)))
    # Per-image labels work too; unconditional nets refuse labels and vice versa.
    make_network(model, params, label=jnp.array([0, 1]))(x, t, 0)
    with pytest.raises(ValueError, match="class-conditional"):
        make_network(model, params)
    with pytest.raises(ValueError, match="unconditional"):
        make_network(ResNet(channels=4, depth=1), params, label=1)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        make_network(model, params, label=3)


# ---------------------------------------------------------------------------------------------
# els_jax.conv: the convolution with a CPU-fast weight gradient


def _conv_oracle(x, kernel, padding):
    """y[b,h,w,o] = Σ_{i,j,c} x̃[b,h+i,w+j,c]·K[i,j,c,o] in float64 NumPy, x̃ padded by k//2."""
    k = kernel.shape[0]
    m = k // 2
    mode = "wrap" if padding == "circular" else "constant"
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (m, m), (m, m), (0, 0)), mode=mode)
    b, h, w, _ = x.shape
    y = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            y += xp[:, i:i + h, j:j + w, :] @ np.asarray(kernel[i, j], np.float64)
    return y


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("k,c,o", [(3, 2, 3), (5, 1, 4), (3, 4, 1), (1, 3, 2)])
def test_conv2d_and_both_gradients_match_the_oracle(padding, k, c, o):
    from els_jax.nets import conv as conv_lib

    rng = np.random.default_rng(k * 100 + c * 10 + o)
    x = jnp.asarray(rng.normal(size=(6, 7, 5, c)), jnp.float32)   # non-square, odd batch
    kernel = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(6, 7, 5, o)), jnp.float32)
    np.testing.assert_allclose(conv_lib.conv2d(x, kernel, padding=padding),
                               _conv_oracle(x, kernel, padding), rtol=1e-5, atol=1e-4)

    def loss(x, kernel, fast):
        y = conv_lib.conv2d(x, kernel, padding=padding, fast_weight_grad=fast)
        return jnp.sum((y - target) ** 2)

    # The oracle's gradients: the loss is quadratic, ∂/∂K = Σ x̃-windows ⊗ 2(y − target).
    y = _conv_oracle(x, kernel, padding)
    r = 2 * (y - np.asarray(target, np.float64))
    m = k // 2
    mode = "wrap" if padding == "circular" else "constant"
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (m, m), (m, m), (0, 0)), mode=mode)
    dk = np.stack([np.stack([np.einsum("bhwc,bhwo->co", xp[:, i:i + 7, j:j + 5, :], r)
                             for j in range(k)]) for i in range(k)])
    # ∂/∂x: scatter r·K[i,j]ᵀ back onto the padded grid, then fold the padding back (dropped
    # for zeros, wrapped around for circular).
    dxp = np.zeros(xp.shape)
    for i in range(k):
        for j in range(k):
            dxp[:, i:i + 7, j:j + 5, :] += r @ np.asarray(kernel[i, j], np.float64).T
    rows, cols = (np.arange(7 + 2 * m) - m) % 7, (np.arange(5 + 2 * m) - m) % 5
    if padding == "zeros":
        dx = dxp[:, m:m + 7, m:m + 5, :]
    else:
        dx = np.zeros(x.shape)
        for p_ in range(7 + 2 * m):
            for q_ in range(5 + 2 * m):
                dx[:, rows[p_], cols[q_], :] += dxp[:, p_, q_, :]
    for fast in (True, False):
        gx, gk = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, kernel, fast)
        np.testing.assert_allclose(gk, dk, rtol=1e-4, atol=1e-4 * np.abs(dk).max())
        np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-4 * np.abs(dx).max())


def test_weight_gradient_im2col_equals_xla_for_chunked_batches():
    # A batch that splits into several chunks (the scan accumulates across them).
    from els_jax.nets import conv as conv_lib

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(12, 40, 40, 8)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(12, 40, 40, 5)), jnp.float32)
    assert conv_lib._chunk_size(12, 40 * 40 * 9 * 8 * 4) < 12
    np.testing.assert_allclose(conv_lib._weight_grad_im2col(x, g, 3),
                               conv_lib.weight_grad_reference(x, g, 3), rtol=1e-4, atol=1e-2)


def test_conv_rejects_even_or_mismatched_kernels():
    from els_jax.nets import conv as conv_lib

    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="odd"):
        conv_lib.conv2d(x, jnp.zeros((2, 2, 2, 1)))
    with pytest.raises(ValueError, match="channels"):
        conv_lib.conv2d(x, jnp.zeros((3, 3, 3, 1)))
    with pytest.raises(ValueError, match="padding"):
        conv_lib.conv2d(x, jnp.zeros((3, 3, 2, 1)), padding="reflect")


def test_sampled_network_supports_forward_mode_and_matches_the_training_network():
    # make_network uses the plain XLA convolutions (fast_weight_grad=False): same values as
    # the training module, and jax.jvp works (a custom_vjp function has no forward mode).
    model = ResNet(channels=8, depth=2)
    params, x, t, _ = _init(model)
    eps_fn = make_network(model, params)
    np.testing.assert_allclose(eps_fn(x, 0.3), model.apply(params, x, jnp.full((2,), 0.3)),
                               atol=1e-6)
    v = jnp.ones_like(x)
    _, tangent = jax.jvp(lambda y: eps_fn(y, 0.3), (x,), (v,))
    # ⟨u, J v⟩ from forward mode (plain convolutions) equals ⟨Jᵀu, v⟩ from reverse mode
    # through the training module (custom weight-gradient convolutions).
    u = jax.random.normal(jax.random.key(5), x.shape)
    jt_u = jax.grad(lambda y: jnp.vdot(u, model.apply(params, y, jnp.full((2,), 0.3))))(x)
    np.testing.assert_allclose(float(jnp.vdot(u, tangent)), float(jnp.vdot(jt_u, v)), rtol=1e-4)
    with pytest.raises(Exception):
        jax.jvp(lambda y: model.apply(params, y, jnp.full((2,), 0.3)), (x,), (v,))


def test_config_names_are_the_networks_that_exist():
    """``nets.config`` names the architectures and paddings without importing Flax; they are
    exactly the ones ``nets.networks`` builds."""
    from els_jax.nets import config as net_config
    from els_jax.nets import networks
    assert set(net_config.ARCH_NAMES) == set(networks.ARCHS)
    assert set(net_config.PADDING_NAMES) == set(networks.PADDINGS)
