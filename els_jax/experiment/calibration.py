"""Calibrating the locality scale of a machine to a network (docs/theory.md §4).

Along the network's own sampler trajectory x_{t_0}, x_{t_1}, … (from the same seeds and
labels as the comparison), at every step i and for every candidate patch size k, compare the
machine's score with the network's, s_net = −ε̂_net / b:

    k*_s(i) = argmax_k  cos( s_k(x_i), s_net(x_i) )        per seed s,
    k(i)    = the median of k*_s(i) over seeds, rounded to the nearest odd size (ties up).

Because both scores are −ε̂/b with the same b > 0, the cosine of the scores equals the cosine of
the ε̂'s. The result is a scale list in the authors' order: index 0 = the lowest-noise (last)
step, so ``scales[m − 1 − i]`` is the size for step i (what ``make_machine`` expects).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.machines import factory as machine_lib
from els_jax.experiment import metrics
from els_jax.core import sampler
from els_jax.core import schedules as schedules_lib
from els_jax.core.data import unit_images

__all__ = ["Calibration", "calibrate", "candidate_machines", "default_candidates", "median_odd"]


class Calibration(NamedTuple):
    """scales: tuple, index 0 = last step; per_step: [m] sizes in step order (0 = first);
    best: [m, S] the best k per step and seed; cosine: [m, K, S] cos(machine_k, network);
    candidates: the K sizes tried; times: the [m + 1] grid."""

    scales: tuple
    per_step: np.ndarray
    best: np.ndarray
    cosine: np.ndarray
    candidates: tuple
    times: np.ndarray


def default_candidates(h: int, w: int) -> tuple[int, ...]:
    """3, 5, …, up to the image size (the largest odd k ≤ min(H, W))."""
    top = min(h, w)
    return tuple(range(3, top + 1, 2)) or (1,)


def median_odd(values, axis=-1) -> np.ndarray:
    """Median along ``axis`` rounded to the nearest odd integer (a tie goes to the larger).

    With an even number of seeds the median of odd sizes can be even (e.g. 4); the nearest odd
    size is then either neighbour, and we take the larger one: 2·floor(m/2) + 1.
    """
    m = np.median(np.asarray(values, np.float64), axis=axis)
    return (2 * np.floor(m / 2) + 1).astype(np.int64)


def calibrate(network_eps: Callable, machines: dict[int, Callable], x_T, times, *,
              schedule=schedules_lib.Cosine(), progress: bool = False,
              neighbours: int | None = None) -> Calibration:
    """Picks, per sampler step, the patch size whose machine best matches the network.

    Args:
      network_eps: the network as ``eps_fn(x, t, i)`` (see ``make_network``); it drives the
        trajectory (deterministic DDIM).
      machines: {k: eps_fn(x, t, i)} one constant-size machine per candidate size k, e.g.
        ``{k: make_machine("els", images, scales=k, boundary="zeros") for k in (3, 5, 7)}``.
        For class-conditional runs every machine and the network must be built for the
        same labels as the seeds in ``x_T``.
      x_T: [S, H, W, C] starting noise of the S calibration seeds.
      times: the descending grid [m + 1] the machines will later be sampled on.
      schedule: the noise schedule of the network and the machines.
      neighbours: None (default) tries every candidate at every step. An integer n tries all
        of them at the first step only; at step i + 1 it tries the candidates within n places
        (in sorted order) of any seed's best size at step i. The network's trajectory does not
        depend on the machines, so this changes which sizes are looked at, never the path: it
        finds the same best sizes whenever the best size moves by at most n places per step
        (the calibrated scales change slowly with t: docs/theory.md §5's ResNet lists move by ≤ 1 place
        per step, its MNIST UNet list by 2 places once).
        Sizes not tried get cosine NaN. For expensive machines (ELS at N = 5000, 32×32) this
        cuts the calibration's cost by the number of candidates over (2n + 1).
    Returns:
      a Calibration (``.scales`` is what ``make_machine(..., scales=...)`` takes).
    """
    if neighbours is not None and neighbours < 0:
        raise ValueError(f"neighbours must be None or ≥ 0; got {neighbours}")
    if not machines:
        raise ValueError("no candidate machines given")
    schedule = schedules_lib.get(schedule)
    cands = tuple(sorted(machines))
    times_np = np.asarray(times, np.float32)
    x = jnp.asarray(x_T, jnp.float32)
    m = len(times_np) - 1
    cos = np.full((m, len(cands), x.shape[0]), np.nan)
    steps = range(m)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="calibrate", leave=False)
    tried = np.arange(len(cands))
    for i in steps:
        t, t_next = jnp.float32(times_np[i]), jnp.float32(times_np[i + 1])
        eps_net = network_eps(x, t, i)
        for j in tried:
            cos[i, j] = metrics.cosine_similarity(eps_net, machines[cands[j]](x, t, i))
        x = sampler.ddim_step(x, eps_net, t, t_next, schedule=schedule)
        if neighbours is not None:
            best_j = np.unique(_best_index(cos[i]))
            near = (best_j[:, None] + np.arange(-neighbours, neighbours + 1)).ravel()
            tried = np.unique(np.clip(near, 0, len(cands) - 1))
    best = np.asarray(cands)[_best_index(cos)]    # [m, S]
    per_step = median_odd(best, axis=1)
    return Calibration(scales=tuple(int(k) for k in per_step[::-1]), per_step=per_step,
                       best=best, cosine=cos, candidates=cands, times=times_np)


def _best_index(cos) -> np.ndarray:
    """argmax over the candidate axis (−2) of [..., K, S] cosines, NaN = not tried. Ties (e.g.
    at t = 1, where a = 0 and every machine returns its candidates' mean) go to the largest
    size: argmax over the reversed axis."""
    rev = np.where(np.isnan(cos), -np.inf, cos)[..., ::-1, :]
    return cos.shape[-2] - 1 - rev.argmax(axis=-2)


def candidate_machines(kind: str, images, candidates: Sequence[int], **machine_kwargs):
    """{k: the machine at size k} for the calibration: one ``make_machine(kind, images,
    scales=candidates, ...)`` (its ``for_size(k)``), so that with ``compile_for`` (the
    calibration's x_T) each size compiles while the next one's bank is built."""
    sizes = sorted({int(k) for k in candidates})
    machine = machine_lib.make_machine(kind, images, scales=sizes, **machine_kwargs)
    return {k: machine.for_size(k) for k in sizes}


# ----------------------------------------------------------------------------------------
# els_soft: a Gaussian window width σ per step, fitted by gradient descent (docs/theory.md §7).

__all__ += ["SigmaCalibration", "calibrate_sigma", "fit_subset"]


class SigmaCalibration(NamedTuple):
    """sigmas: tuple, index 0 = last step (what ``make_machine("els_soft", sigmas=...)``
    takes); per_step: [m] fitted σ in step order (0 = first); init: [m] the starting σ per
    step; cosine_before, cosine_after: [m] mean cosine over seeds between the machine's and
    the network's ε̂ at the starting and at the fitted σ; loss: [m, steps] −mean cosine at
    every iteration; times: the [m + 1] grid; engine, pixels: what the fit ran on (the
    machine's engine, and the query pixels per seed of its cosine)."""

    sigmas: tuple
    per_step: np.ndarray
    init: np.ndarray
    cosine_before: np.ndarray
    cosine_after: np.ndarray
    loss: np.ndarray
    times: np.ndarray
    engine: str = "soft"       # the machine's engine in the fit ("soft_shiftmap" or "soft")
    pixels: int | None = None  # query pixels per seed the cosine was taken over


def _mean_cosine(a, b):
    """Mean over the batch of cos(a_s, b_s) over all pixels (jnp, differentiable)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    den = jnp.sqrt(jnp.sum(a * a, axis=1) * jnp.sum(b * b, axis=1))
    return jnp.mean(jnp.sum(a * b, axis=1) / jnp.maximum(den, 1e-30))


def _initial_sigmas(init_sigmas, init_scales, m: int):
    """Starting σ per step in step order (0 = first), or None per step = warm start from
    the previous step's fit (the first step from the box k_max)."""
    from els_jax.machines import soft
    if init_sigmas is not None and init_scales is not None:
        raise ValueError("pass init_sigmas or init_scales, not both")
    if init_scales is not None:
        scales = np.atleast_1d(np.asarray(init_scales, np.int64))
        init_sigmas = [soft.sigma_for_scale(k) for k in scales]
        if len(scales) == 1:
            init_sigmas = init_sigmas[0]
    if init_sigmas is None:
        return [None] * m
    values = np.atleast_1d(np.asarray(init_sigmas, np.float64))
    if values.size == 1:
        values = np.full(m, values[0])
    if values.shape != (m,):
        raise ValueError(f"need one initial sigma per step ({m}); got {values.size}")
    if not np.all(values > 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"initial sigmas must be finite and > 0; got {values}")
    return [float(s) for s in values[::-1]]              # index 0 = last step → step order


def fit_subset(images, mask, size: int | None, seed: int = 0):
    """The images an els_soft fit uses: all (size None), or a fixed random subset of ``size``
    of the images ``mask`` selects (sorted indices; all of them if there are fewer)."""
    images = np.asarray(unit_images(images), np.float32)
    if size is None:
        return images
    if int(size) < 1:
        raise ValueError(f"fit_images must be a positive number of images or None; got {size}")
    if mask is not None:
        images = images[np.asarray(mask, bool)]
    if images.shape[0] <= int(size):
        return images
    pick = np.sort(np.random.default_rng(seed).choice(images.shape[0], int(size), replace=False))
    return images[pick]


SIGMA_METHODS = ("adam", "search")
__all__ += ["SIGMA_METHODS", "parabolic_search"]


def parabolic_search(loss: Callable[[float], float], p0: float, *, evals: int,
                     width: float = 0.25, lo: float = -np.inf, hi: float = np.inf,
                     tol: float = 0.01):
    """Minimises a smooth function of one variable from a start ``p0`` with at most
    ``evals`` (≥ 3) evaluations: loss at p0 − width, p0, p0 + width, then repeatedly at the
    vertex of the parabola through the three best points so far (when that parabola opens
    upwards; otherwise 2·width beyond the best point, downhill), clipped to [lo, hi] and to
    2·width beyond the points seen; stops early when the next point is within ``tol`` of one
    already evaluated. Successive parabolic interpolation: on a quadratic the first vertex is
    exact. Returns (best point, its loss, the loss at p0, [(point, loss)] in evaluation order)."""
    if evals < 3:
        raise ValueError(f"the search needs at least 3 evaluations; got {evals}")
    history = []

    def run(p):
        value = float(loss(float(p)))
        history.append((float(p), value if np.isfinite(value) else np.inf))
    for p in (p0, p0 - width, p0 + width):
        run(float(np.clip(p, lo, hi)))
    while len(history) < evals:
        best = sorted(history, key=lambda pv: pv[1])[:3]
        (x1, f1), (x2, f2), (x3, f3) = sorted(best)
        seen = [p for p, _ in history]
        # Newton's divided differences: f ≈ f1 + d1·(p − x1) + c2·(p − x1)(p − x2).
        d1 = (f2 - f1) / (x2 - x1)
        c2 = ((f3 - f2) / (x3 - x2) - d1) / (x3 - x1)
        if c2 > 0 and np.isfinite(c2):               # opens upwards: its vertex
            nxt = 0.5 * (x1 + x2) - d1 / (2 * c2)
        else:                                        # downhill, beyond the best point
            xb = best[0][0]
            nxt = xb + (2 * width if xb >= max(seen) else -2 * width if xb <= min(seen)
                        else 0.0)
        nxt = float(np.clip(nxt, max(lo, min(seen) - 2 * width), min(hi, max(seen) + 2 * width)))
        if min(abs(nxt - p) for p in seen) < tol:
            break
        run(nxt)
    p_best, f_best = min(history, key=lambda pv: pv[1])
    return p_best, f_best, history[0][1], history


def _search_engine(k_max, boundary, wrap_patches, h, w, c, fit_pixels, seed) -> str:
    """The engine of a search fit (forward passes only): "auto" (the shift-map kernel over
    every pixel) when the kernel builds and costs no more than the XLA bank over the
    ``fit_pixels`` subset, else "xla". Cost per image in multiply-adds, from the pairs each
    computes: the kernel 2·k_max + C per pair of every pixel, the XLA form k_max²·C per pair
    of the subset (on mnist5k, k_max = 9 and 128 pixels: the subset; the UNet's k_max = 29,
    whose 4×4 interior leaves few pairs: the kernel)."""
    from els_jax.machines import soft
    if soft.resolve_engine("auto") != "shiftmap":
        return "xla"
    if fit_pixels is None or int(fit_pixels) >= h * w:
        return "auto"
    k = soft.check_k_max(k_max, h, w, boundary, wrap_patches)
    subset = soft.sample_pixels(k, boundary, wrap_patches, h, w, int(fit_pixels), seed)
    kernel = soft.pair_count(k, boundary, wrap_patches, h, w) * (2 * k + c)
    xla = soft.pair_count(k, boundary, wrap_patches, h, w, subset) * (k * k * c)
    return "auto" if kernel <= xla else "xla"


def calibrate_sigma(network_eps: Callable, images, x_T, times, *, k_max: int,
                    boundary: str = "circular", wrap_patches: bool = False, mask=None,
                    init_sigmas=None, init_scales=None, steps: int = 60, lr: float = 0.1,
                    schedule=schedules_lib.Cosine(), optimizer=None,
                    block: int | None = None, fit_images: int | None = None,
                    fit_pixels: int | None = None, subset_seed: int = 0,
                    method: str = "adam", engine: str | None = None,
                    progress: bool = False) -> SigmaCalibration:
    """Fits the els_soft machine's window width σ per sampler step to a network (docs/theory.md §7).

    Along the network's own deterministic DDIM trajectory from ``x_T`` (as ``calibrate``), at
    every step i with x_i, t_i and the network's ε̂_net = network_eps(x_i, t_i, i):

        σ_i = argmax_σ  mean_s cos( ε̂_σ(x_i,s), ε̂_net(x_i,s) ),     ε̂_σ = (x − a·x̂_0,σ)/b,

    by gradient descent on log σ (``steps`` iterations of Adam without momentum, β2 = 0.9,
    learning rate ``lr`` decayed to 0 on a cosine; or any optax ``optimizer``), the
    derivative taken through the machine (``SoftMachine.x0_sigma``) in forward mode: one
    ``jax.jvp`` per iteration gives the loss and d loss / d log σ together (for one scalar
    parameter it is the gradient ``jax.grad`` would give, at about the cost of two forward
    passes instead of a rematerialised reverse pass), one compiled fit for every step. The
    fit at a step is kept only if it beats its starting point.

    With ``method="search"`` the derivative is not used: ``steps`` is the number of loss
    evaluations per sampler step (``parabolic_search`` on log σ from the warm start, width
    0.25), each one forward pass of the machine, which then runs on its fastest engine
    (the fused shift-map kernel on a CPU, ``soft.resolve_engine``): a smooth function of one
    variable needs few evaluations (5 reach a few per cent of the optimum on digits).

    Cost control (the fit runs the exact machine ``steps`` times per sampler step): with
    ``fit_pixels`` the cosine is taken over a fixed random subset of about that many query
    pixels (``subset_seed``; ``soft.sample_pixels``: with zero padding an edge pixel brings
    its whole edge group, and the count includes them), and the machine computes x̂_0 only
    there (``SoftMachine.x0_sigma(pixels=...)``): exact candidates, cost in proportion to
    the pixels. With ``fit_images`` the machine of the fit holds a fixed
    random subset of that many training images: cheaper still, but fewer candidates pull σ
    down (on digits, 10 % of the images: −10 % to −15 % per step). Either way the fitted σ is
    then used by the machine of all N images over all pixels.

    Args:
      network_eps: the network as ``eps_fn(x, t, i)``; it drives the trajectory.
      images: training set [N, H, W, C] (with ``mask``: the class's images are selected).
      x_T: [S, H, W, C] starting noise of the S calibration seeds.
      times: the descending grid [m + 1].
      k_max, boundary, wrap_patches, mask: the machine (``make_machine("els_soft", ...)``).
      init_sigmas: starting σ, a float or one per step (index 0 = last step); or
      init_scales: an int patch size or a scale list (index 0 = last step), each started at
        the Gaussian with the box's second moment (``soft.sigma_for_scale``). Neither: each
        step starts from the previous step's fit, the first from the k_max box.
      steps, lr: iterations per step and the initial learning rate (on log σ).
      optimizer: an optax GradientTransformation replacing the default (``lr`` unused).
      block: logits per streamed chunk of the machine (memory knob).
      fit_pixels: fit on about this many query pixels (a fixed random subset), or None = all.
      fit_images: fit on this many training images (a fixed random subset), or None = all.
      method: "adam" (gradient descent through the machine, forward mode) or "search"
        (``parabolic_search``, forward passes only).
      engine: the machine's engine (``soft.ENGINES``); None = "xla" for "adam"; for
        "search" the cheaper of the shift-map kernel over every pixel and the XLA form over
        the ``fit_pixels`` subset (``_search_engine``; with the kernel the cosine is then
        taken over every pixel). Gradients always come from the XLA form; with fit_pixels
        the XLA form computes only the chosen pixels, while the shift-map kernel computes
        every pixel (a given engine="shiftmap" keeps the cosine over the chosen ones).
    Returns:
      a SigmaCalibration (``.sigmas`` is what ``make_machine("els_soft", sigmas=...)`` takes).

        >>> cal = calibrate_sigma(net, images, x_T, uniform_times(20), k_max=11, boundary="zeros")
    """
    import optax

    from els_jax.core import conversions
    from els_jax.machines import soft
    schedule = schedules_lib.get(schedule)
    times_np = np.asarray(times, np.float32)
    m = len(times_np) - 1
    if m < 1:
        raise ValueError("times must hold at least two points")
    if method not in SIGMA_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {SIGMA_METHODS}")
    kw = {} if block is None else {"block": int(block)}
    images = fit_subset(images, mask, fit_images, subset_seed)
    if fit_images is not None:
        mask = None                       # the subset holds the selected images only
    h, w, c = np.shape(x_T)[1:4]
    if fit_pixels is not None and int(fit_pixels) < 1:
        raise ValueError(f"fit_pixels must be a positive number of pixels or None; got "
                         f"{fit_pixels}")
    if engine is None:
        engine = "xla" if method == "adam" else _search_engine(
            k_max, boundary, wrap_patches, h, w, c, fit_pixels, subset_seed)
        if engine == "auto":
            fit_pixels = None             # the kernel computes every pixel: use them all
    machine = soft.make_soft_machine(images, sigmas=1.0, k_max=k_max, boundary=boundary,
                                     wrap_patches=wrap_patches, schedule=schedule, mask=mask,
                                     engine=engine, **kw)
    starts = _initial_sigmas(init_sigmas, init_scales, m)
    pixels, where = None, None
    if fit_pixels is not None:
        if int(fit_pixels) < h * w:
            pixels = machine.sample_pixels(int(fit_pixels), np.shape(x_T), subset_seed)
            on = np.zeros(h * w, bool)
            on[machine.computed_pixels(pixels, np.shape(x_T))] = True
            where = jnp.asarray(on.reshape(1, h, w, 1))
    if optimizer is None:
        # No momentum and a short second-moment memory: in log σ the valley is steep on the
        # wide side and flat on the narrow side; momentum (β1 = 0.9) overshoots into the flat
        # side, where a long memory of the steep gradients (β2 = 0.999) stalls the steps.
        optimizer = optax.adam(optax.cosine_decay_schedule(lr, max(1, steps)), b1=0.0, b2=0.9)

    # The machine's bank (or images) enters the jitted fit as an argument, not a constant.
    pure, arrays = machine.x0_sigma_parts()
    pixels = None if pixels is None else tuple(int(p) for p in pixels)

    def loss_fn(log_sigma, x, t, eps_net, arrays):
        x0 = pure(x, machine.coefficients(x, t), jnp.exp(log_sigma), arrays, pixels)
        eps = conversions.x0_to_eps(x0, x, t, schedule=schedule)
        if where is not None:             # the cosine over the computed pixels only
            eps, eps_net = jnp.where(where, eps, 0.0), jnp.where(where, eps_net, 0.0)
        return -_mean_cosine(eps, eps_net)

    @jax.jit
    def fit(log_sigma, x, t, eps_net, arrays):
        def value_and_grad(p, x, t, eps_net):    # forward mode: one scalar parameter
            return jax.jvp(lambda q: loss_fn(q, x, t, eps_net, arrays), (p,),
                           (jnp.ones_like(p),))

        def body(carry, _):
            p, state = carry
            loss, grad = value_and_grad(p, x, t, eps_net)
            updates, state = optimizer.update(grad, state, p)
            return (optax.apply_updates(p, updates), state), loss

        (p, _), history = jax.lax.scan(body, (log_sigma, optimizer.init(log_sigma)), None,
                                       length=steps)
        final = loss_fn(p, x, t, eps_net, arrays)
        start = history[0] if steps else final
        keep = final <= start
        return jnp.where(keep, p, log_sigma), start, jnp.minimum(final, start), history

    loss_at = jax.jit(loss_fn)
    x = jnp.asarray(x_T, jnp.float32)
    fitted, init, before, after, losses = [], [], [], [], []
    previous = soft.sigma_for_scale(machine.k_max)
    step_range = range(m)
    if progress:
        from tqdm.auto import tqdm
        step_range = tqdm(step_range, desc="calibrate σ", leave=False)
    for i in step_range:
        t, t_next = jnp.float32(times_np[i]), jnp.float32(times_np[i + 1])
        eps_net = jnp.asarray(network_eps(x, t, i), jnp.float32)
        s0 = previous if starts[i] is None else starts[i]
        if method == "search":
            p, l1, l0, seen = parabolic_search(
                lambda q: loss_at(jnp.float32(q), x, t, eps_net, arrays), float(np.log(s0)),
                evals=steps, lo=float(np.log(0.05)), hi=float(np.log(100.0)))
            log_sigma = p
            history = np.full(steps, l1, np.float32)
            history[:len(seen)] = [v for _, v in seen]
        else:
            log_sigma, l0, l1, history = fit(jnp.float32(np.log(s0)), x, t, eps_net, arrays)
        previous = float(np.exp(log_sigma))
        fitted.append(previous)
        init.append(s0)
        before.append(-float(l0))
        after.append(-float(l1))
        losses.append(np.asarray(history))
        x = sampler.ddim_step(x, eps_net, t, t_next, schedule=schedule)
    per_step = np.asarray(fitted)
    return SigmaCalibration(sigmas=tuple(float(s) for s in per_step[::-1]), per_step=per_step,
                            init=np.asarray(init), cosine_before=np.asarray(before),
                            cosine_after=np.asarray(after),
                            loss=np.asarray(losses).reshape(m, steps), times=times_np,
                            engine=machine.engine(0)["engine"],
                            pixels=int(h * w if where is None else np.asarray(where).sum()))
