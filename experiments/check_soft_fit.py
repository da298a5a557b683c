"""Does the cheap els_soft width fit agree with the full one? (docs/theory.md §7.5; README.)

On mnist5k the experiment fits σ per step on the cosine over 128 of the 1024 pixels with 6
gradient steps at rate 0.25 (``DATASET_DEFAULTS``) instead of every pixel with 25 at 0.1.
This script runs both recipes on the embedded 8×8 digits with the shipped digits ResNet,
along the same network trajectories (8 seeds), and prints JSON: per step the two σ, their
relative difference, and the mean cosine each σ reaches on the FULL objective (every pixel).
The cheap fit's noise depends on how many (seed, pixel) terms its cosine has: the default, 32
pixels × 8 seeds = 256 terms, has half of mnist5k's 128 × 4 = 512. Where the objective is flat
in σ (the first and the last steps) σ is not determined and the cosines say so.

    python experiments/check_soft_fit.py                     # 32 pixels, 6 steps at 0.25
    python experiments/check_soft_fit.py --pixels 16 --steps 8 --lr 0.1
    python experiments/check_soft_fit.py --method search --pixels 64 --steps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import els_jax as ej
from els_jax.core import conversions, sampler
from els_jax.experiment import calibration
from els_jax.experiment.config import CHECKPOINTS_DIR
from els_jax.experiment.seeds import seed_noise
from els_jax.machines import soft
from els_jax.nets import networks
from els_jax.nets.train import load_trained


def full_objective(net, images, x_T, times, sigmas_step_order, k_max, boundary):
    """Mean cosine over seeds (every pixel) of the machine's ε̂ at each step's σ with the
    network's, along the network's DDIM trajectory: [m]."""
    machine = soft.make_soft_machine(images, sigmas=1.0, k_max=k_max, boundary=boundary)
    x, out = jnp.asarray(x_T), []
    for i in range(len(times) - 1):
        t, t_next = jnp.float32(times[i]), jnp.float32(times[i + 1])
        eps_net = net(x, t, i)
        x0 = machine.x0_sigma(x, t, float(sigmas_step_order[i]))
        eps = conversions.x0_to_eps(x0, x, t)
        a, b = eps.reshape(len(x), -1), eps_net.reshape(len(x), -1)
        out.append(float(jnp.mean(jnp.sum(a * b, 1) / jnp.sqrt(jnp.sum(a * a, 1) *
                                                                 jnp.sum(b * b, 1)))))
        x = sampler.ddim_step(x, eps_net, t, t_next)
    return np.asarray(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pixels", type=int, default=32, help="pixels of the cheap fit (of 64)")
    p.add_argument("--steps", type=int, default=6, help="gradient steps of the cheap fit")
    p.add_argument("--full-steps", type=int, default=25)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.25, help="learning rate of the cheap fit")
    p.add_argument("--method", choices=["adam", "search"], default="adam",
                   help="the cheap fit: gradient steps, or a parabolic search with --steps "
                        "loss evaluations (forward passes; --pixels 64 = every pixel)")
    p.add_argument("--start", choices=["scales", "previous"], default="scales",
                   help="the cheap fit's start per step: the Gaussian of the step's ELS size, "
                        "or the previous step's fit")
    args = p.parse_args()

    model, params, tcfg = load_trained(str(CHECKPOINTS_DIR / "digits_resnet_zeros"))
    images, _ = ej.load_dataset("digits")
    images = np.asarray(images, np.float32)
    net = networks.make_network(model, params)
    times = np.asarray(sampler.uniform_times(20, t_max=0.95))
    x_T = seed_noise(0, list(range(32, 32 + args.seeds)), images.shape[1:])
    # The ELS sizes of the digits main job (README): the fits start from their Gaussians.
    scales = [3] * 8 + [5] * 7 + [7] * 5
    k_max = max(scales)
    kw = dict(k_max=k_max, boundary="zeros", init_scales=scales)
    t0 = time.perf_counter()
    full = calibration.calibrate_sigma(net, images, x_T, times, steps=args.full_steps, **kw)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    cheap_kw = dict(kw, lr=args.lr)
    if args.start == "previous":
        cheap_kw.pop("init_scales")
    cheap = calibration.calibrate_sigma(net, images, x_T, times, steps=args.steps,
                                        fit_pixels=args.pixels if args.pixels < 64 else None,
                                        method=args.method, **cheap_kw)
    t_cheap = time.perf_counter() - t0
    rel = cheap.per_step / full.per_step - 1
    cos_full = full_objective(net, images, x_T, times, full.per_step, k_max, "zeros")
    cos_cheap = full_objective(net, images, x_T, times, cheap.per_step, k_max, "zeros")
    print(json.dumps({
        "platform": {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                     "cpu": platform.processor() or platform.machine()},
        "workload": {"data": "digits 1797×8×8", "seeds": args.seeds, "steps": 20,
                     "k_max": k_max, "full": {"pixels": 64, "gradient_steps": args.full_steps},
                     "cheap": {"pixels": args.pixels, "method": args.method,
                               "steps_or_evaluations": args.steps,
                               "lr": args.lr, "start": args.start}},
        "seconds": {"full": round(t_full, 2), "cheap": round(t_cheap, 2)},
        "sigma_full": np.round(full.per_step, 3).tolist(),
        "sigma_cheap": np.round(cheap.per_step, 3).tolist(),
        "relative_difference": np.round(rel, 3).tolist(),
        "median_abs_relative_difference": round(float(np.median(np.abs(rel))), 4),
        "cosine_full_objective": {"full": np.round(cos_full, 5).tolist(),
                                  "cheap": np.round(cos_cheap, 5).tolist()},
        "largest_cosine_loss": round(float(np.max(cos_full - cos_cheap)), 5),
    }, indent=1))


if __name__ == "__main__":
    main()
