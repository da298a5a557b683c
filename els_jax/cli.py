"""The ``els-jax`` command line: parses the arguments and calls library functions.

All of the package's argument parsing lives here (the library never imports argparse).

    els-jax sample --dataset digits --machine ideal --num 16 --steps 20 --out runs/is
    els-jax train --config experiments/configs/digits_resnet.py --workdir runs/digits_resnet
    els-jax reproduce --dataset digits --seeds 32 --out runs/digits
    els-jax mosaic --run runs/digits

A bad input (unknown data set, data not prepared, an even patch size, no such checkpoint or
config file, ...) prints one line ``els-jax: error: <message>`` to stderr and exits with
status 2; ``els-jax --debug ...`` (or ``--debug`` after the subcommand) shows the traceback
instead. Any other exception is a bug and always shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import linecache
import os
import sys
import time


def _new_run_dir(prefix: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{prefix}-{stamp}")


# ---------------------------------------------------------------------------------------------
# els-jax sample


def _cmd_sample(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import els_jax as ej
    from els_jax.experiment.figures import save_image_grid

    options = _machine_options(args)      # flag errors before any data is loaded
    args.steps = _sample_steps(args.steps, options)
    # uint8 where the set needs no resizing (docs/theory.md §9.2): the same machine, a quarter
    # of the memory.
    images, labels = ej.load_dataset(args.dataset, data_dir=args.data_dir,
                                     image_size=args.image_size, max_examples=args.max_examples,
                                     keep_uint8=True)
    images = jnp.asarray(images)          # on the device once: the machine holds this array
    mask = None
    if args.label is not None:
        mask = labels == args.label
        if not mask.any():
            raise ValueError(f"--label {args.label}: no training image of {args.dataset!r} has "
                             f"this label; its labels are {sorted(set(labels.tolist()))}")
    schedule = ej.schedules.get(args.schedule)
    key = jax.random.PRNGKey(args.seed)
    if args.machine == "scfdm":           # its perturbations come from the run's seed
        options["key"] = jax.random.fold_in(key, 2)
    eps_fn = ej.make_machine(args.machine, images, boundary=args.boundary, schedule=schedule,
                             mask=mask, **options)
    x_T = jax.random.normal(key, (args.num,) + images.shape[1:], jnp.float32)
    times = (ej.uniform_times(args.steps) if args.grid == "uniform"
             else ej.karras_times(args.steps, schedule=schedule))
    t0 = time.perf_counter()
    x0 = ej.sample(eps_fn, x_T, times, schedule=schedule, eta=args.eta,
                   key=jax.random.fold_in(key, 1), progress=True, solver=args.solver)
    x0 = np.asarray(jax.block_until_ready(x0))
    elapsed = time.perf_counter() - t0
    out = args.out or _new_run_dir(f"sample-{args.machine}")
    os.makedirs(out, exist_ok=True)
    # Nearest training image per sample: "is it new or memorised?" at a glance.
    nearest, rms = ej.nearest_training(x0, images)
    dist = rms * np.sqrt(x0[0].size)                      # ‖x − x_nearest‖
    np.savez(os.path.join(out, "samples.npz"), samples=x0, x_T=np.asarray(x_T),
             times=np.asarray(times), nearest_index=nearest, nearest_dist=dist)
    save_image_grid(os.path.join(out, "samples.png"), x0,
                    title=f"{args.machine} machine, {args.dataset}, {args.steps} steps")
    options.pop("key", None)
    summary = {"machine": args.machine, "dataset": args.dataset, "n_train": int(len(images)),
               "num": args.num, "steps": args.steps, "solver": args.solver, "grid": args.grid,
               "elapsed_s": round(elapsed, 3),
               "median_nearest_train_dist": float(np.median(dist)), "out": out}
    summary.update({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0


# Options of `els-jax sample` that only some machines take: flag (argparse dest) → (the
# ``make_machine`` keyword, the machines that take it).
_MACHINE_FLAGS = {
    "k": ("scales", ("local", "els")),
    "rank": ("rank", ("gaussian",)),
    "tau": ("tau", ("pca_locality",)),
    "sigma": ("sigmas", ("els_soft",)),
    "k_max": ("k_max", ("els_soft",)),
    "temperature": ("temperature", ("scfdm",)),
    "perturbations": ("num_perturb", ("scfdm",)),
    "noise_scale": ("noise_scale", ("scfdm",)),
    "top_k": ("top_k", ("scfdm",)),
}
DEFAULT_K = 3          # patch size of local / els without --k
DEFAULT_K_MAX = 5      # els_soft's window support without --k-max


def _machine_options(args) -> dict:
    """The ``make_machine`` keywords of the flags given for ``args.machine`` (plus defaults
    for what it needs); a flag that the machine does not take is an error, not ignored."""
    options = {}
    for dest, (keyword, machines) in _MACHINE_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if args.machine not in machines:
            raise ValueError(f"--{dest.replace('_', '-')} is an option of --machine "
                             f"{' / '.join(machines)}; the {args.machine} machine does not take "
                             "it (leave it out)")
        options[keyword] = value
    if args.machine in _MACHINE_FLAGS["k"][1]:
        options.setdefault("scales", DEFAULT_K)
    if args.machine == "els_soft":
        from els_jax.machines.soft import sigma_for_scale

        options.setdefault("k_max", DEFAULT_K_MAX)
        options.setdefault("sigmas", round(sigma_for_scale(DEFAULT_K), 4))
    return options


def _sample_steps(steps: int | None, options: dict) -> int:
    """The number of sampler steps: --steps, else the length of a per-step list (--k,
    --sigma), else 20. A list of another length than --steps is an error."""
    lists = {name: len(v) for name, v in options.items()
             if name in ("scales", "sigmas") and isinstance(v, tuple)}
    for name, length in lists.items():
        flag = "--k" if name == "scales" else "--sigma"
        if steps is not None and steps != length:
            raise ValueError(f"{flag} gives {length} per-step values but --steps is {steps}; "
                             f"give one value, or as many as steps")
        steps = length
    if steps is None:
        return 20
    if steps < 1:
        raise ValueError(f"--steps must be at least 1; got {steps}")
    return steps


def _add_sample_subcommand(sub):
    from els_jax.machines.factory import MACHINES

    p = sub.add_parser("sample", help="sample from an analytic machine and write a PNG grid + .npz",
                       description="Sample from an analytic machine; writes samples.png, "
                                   "samples.npz (samples, x_T, times, nearest training image) "
                                   "and summary.json to --out.")
    p.add_argument("--dataset", default="digits", help="digits | mnist5k | mnist | fashion_mnist | cifar10 | celeb_a | path.npz")
    p.add_argument("--data-dir", default=None, help="prepared TFDS data dir (no downloads)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--machine", default="ideal", choices=MACHINES)
    p.add_argument("--k", type=_one_or_per_step_sizes, default=None,
                   help=f"local / els: the patch size (odd; default {DEFAULT_K}), or one per "
                        "step comma-separated, index 0 = the last step (e.g. the MNIST "
                        "ResNet's 3,3,5,5,5,7,7,7,9,9,11,11,11,11,13,15,15,15,15,15); a list "
                        "sets --steps to its length")
    p.add_argument("--rank", type=int, default=None,
                   help="gaussian: keep the top RANK principal components (default all)")
    p.add_argument("--tau", type=float, default=None,
                   help="pca_locality: the locality mask threshold in [0, 1] (default 0.02)")
    p.add_argument("--sigma", type=_sigmas, default=None,
                   help="els_soft: the Gaussian window's width σ > 0, or one per step "
                        "comma-separated (index 0 = last step; default 0.8165, the width of "
                        f"a {DEFAULT_K}×{DEFAULT_K} box)")
    p.add_argument("--k-max", type=int, default=None,
                   help=f"els_soft: the window's support, odd (default {DEFAULT_K_MAX})")
    p.add_argument("--temperature", type=float, default=None,
                   help="scfdm: the softmax temperature τ > 0 (default 1)")
    p.add_argument("--perturbations", type=int, default=None,
                   help="scfdm: M, the perturbed copies averaged (default 10)")
    p.add_argument("--noise-scale", type=float, default=None,
                   help="scfdm: s, the perturbations' scale (default 0.1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="scfdm: restrict the softmax to the k nearest images (default all)")
    p.add_argument("--boundary", default="zeros", choices=["zeros", "circular"])
    p.add_argument("--label", type=int, default=None, help="class-conditional: training label")
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default 20, or the length of a --k or --sigma list)")
    p.add_argument("--eta", type=float, default=0.0, help="0 = DDIM, 1 = DDPM (ddim only)")
    p.add_argument("--solver", default="ddim", choices=["ddim", "heun"],
                   help="ddim (default) or heun (EDM's second order, 2·steps − 1 model calls)")
    p.add_argument("--grid", default="uniform", choices=["uniform", "karras"],
                   help="time grid: uniform in t (default) or Karras et al.'s σ grid (ρ = 7)")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: a new one under ./runs)")
    p.set_defaults(func=_cmd_sample)
    return p


# ---------------------------------------------------------------------------------------------
# els-jax train


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints; got {text!r}") from err


def _channels(text: str):
    values = _int_tuple(text)
    return values[0] if len(values) == 1 else values


# CLI flag (argparse dest) → TrainConfig field, for flags that override the config one to one.
_TRAIN_OVERRIDES = ("dataset", "arch", "padding", "conditional", "num_classes", "channels",
                    "depth", "attention_resolutions", "emb_dim", "image_size", "data_dir",
                    "max_examples", "schedule", "batch_size", "steps", "epochs", "lr",
                    "lr_decay", "weight_decay", "grad_clip", "ema", "seed", "checkpoint_every",
                    "keep_checkpoints", "log_every")


def config_from_args(args: argparse.Namespace):
    """TrainConfig from ``--config FILE`` (or the defaults), overridden by explicit flags."""
    from els_jax.nets.train import TrainConfig, load_config

    config = load_config(args.config) if args.config else TrainConfig()
    overrides = {k: getattr(args, k) for k in _TRAIN_OVERRIDES
                 if getattr(args, k, None) is not None}
    # --steps and --epochs both mean "how long": the one given on the command line wins over
    # whatever the config file set.
    if "epochs" in overrides and "steps" not in overrides:
        overrides["steps"] = None
    return dataclasses.replace(config, **overrides).validate()


def _cmd_train(args: argparse.Namespace) -> int:
    import jax

    from els_jax.nets.train import METRICS_FILE, train_and_evaluate

    config = config_from_args(args)
    print(f"els-jax train: {config.arch} ({config.padding} padding) on {config.dataset} → "
          f"{args.workdir}, {len(jax.devices())} device(s)")
    start = time.time()
    train_and_evaluate(config, args.workdir, progress=not args.no_progress)
    metrics_path = os.path.join(args.workdir, METRICS_FILE)
    last = None
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            lines = [line for line in f if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    summary = f"done in {time.time() - start:.1f} s"
    if last is not None:
        summary += f"; step {last['step']}, loss {last['loss']:.4f}"
    print(summary)
    return 0


def add_train_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``train`` to an argparse subparsers object; the parsed args carry ``func``.

        els-jax train --config experiments/configs/digits_resnet.py --workdir /tmp/run
        els-jax train --dataset digits --arch resnet --channels 64 --steps 4000 --workdir /tmp/r
    """
    from els_jax.core.schedules import SCHEDULES
    from els_jax.nets.config import ARCH_NAMES, PADDING_NAMES

    p = subparsers.add_parser(
        "train", help="train a ResNet/UNet noise-prediction network (resumes from workdir)",
        description="Train an ε-prediction network (docs/theory.md §5). Flags override the values of "
                    "--config; the run resumes from the latest checkpoint in --workdir.")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, config.json)")
    p.add_argument("--config", help="Python file defining get_config() -> TrainConfig")
    p.add_argument("--dataset", help="digits | mnist5k | mnist | fashion_mnist | cifar10 | celeb_a | X.npz")
    p.add_argument("--arch", choices=sorted(ARCH_NAMES))
    p.add_argument("--padding", choices=sorted(PADDING_NAMES))
    p.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="condition on the class label")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--channels", type=_channels,
                   help="ResNet width (e.g. 256) or UNet widths (e.g. 64,128,256)")
    p.add_argument("--depth", type=int, help="ResNet residual layers")
    p.add_argument("--attention-resolutions", type=_int_tuple,
                   help="UNet self-attention at these spatial sizes, e.g. 8 or 16,8")
    p.add_argument("--emb-dim", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--data-dir", help="prepared TFDS data dir (default $TFDS_DATA_DIR)")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--schedule", choices=sorted(SCHEDULES))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema", type=float, help="EMA decay, e.g. 0.999")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p


# ---------------------------------------------------------------------------------------------
# els-jax reproduce


def _add_reproduce_subcommand(sub):
    p = sub.add_parser(
        "reproduce", help="the paper's experiment: train, calibrate, compare ELS/LS/IS with the "
                          "network, write report.json + figures (resumes an interrupted run)")
    p.add_argument("--dataset", default="digits",
                   help="digits | mnist5k | mnist | fashion_mnist | cifar10 | celeb_a | path.npz")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="prepared TFDS data dir (no downloads)")
    p.add_argument("--arch", default="resnet", choices=["resnet", "unet"])
    p.add_argument("--padding", default="zeros", choices=["zeros", "circular"])
    p.add_argument("--conditional", action="store_true", help="class-conditional network and "
                   "machines (seed s gets label s mod #classes)")
    p.add_argument("--checkpoint", default=None,
                   help="reuse the network trained in this directory (els-jax train --workdir)")
    p.add_argument("--train-steps", type=int, default=None, help="override the training length")
    p.add_argument("--seeds", type=int, default=32, help="comparison seeds")
    p.add_argument("--calib-seeds", type=int, default=None,
                   help="calibration seeds, disjoint from the compared ones (default 8; 4 on "
                        "mnist5k)")
    p.add_argument("--machine-steps", type=int, default=20)
    p.add_argument("--network-steps", type=int, default=150,
                   help="DDIM steps for the network (the paper's 150; machines use --machine-steps)")
    p.add_argument("--t-max", type=float, default=None,
                   help="first time of the grids shared by machines and network (default: the "
                        "authors' effective start (n-1)/n, 0.95 for 20 steps; docs/theory.md §8)")
    p.add_argument("--compare-t-max", type=_times, default=None,
                   help="further starts reported side by side, e.g. 1 or 1,0.9 ('' for none; "
                        "default 1, none on mnist5k)")
    p.add_argument("--side-families", type=_names, default=None,
                   help="families also sampled from the --compare-t-max starts, e.g. els,ls,is "
                        "(default: every family; els, ls, is on mnist5k; els and is always)")
    p.add_argument("--retrain", action="store_true",
                   help="train the network even if the repository ships one for this run "
                        "(experiments/checkpoints/)")
    p.add_argument("--candidates", type=_odd_sizes, default=None,
                   help="patch sizes for the calibration, e.g. 3,5,7 (default 3, 5, …, image size)")
    p.add_argument("--calib-neighbours", type=_neighbours, default=1,
                   help="after the first step, calibrate only the sizes within this many "
                        "places of the last step's best ('all' = every size; default 1)")
    p.add_argument("--families", type=_names, default=None,
                   help="families compared, e.g. els,ls,is,gaussian (default: all; els and is "
                        "always run)")
    p.add_argument("--soft-method", default=None, choices=["search", "adam"],
                   help="els_soft: the width fit per sampler step, a parabolic search on log σ "
                        "(forward passes only) or Adam through the machine (default search)")
    p.add_argument("--soft-steps", type=int, default=None,
                   help="els_soft: loss evaluations (search, default 5) or gradient steps "
                        "(adam, default 25) per sampler step of the width fit")
    p.add_argument("--soft-lr", type=float, default=None,
                   help="els_soft, adam: the width fit's learning rate on log σ (default 0.1)")
    p.add_argument("--soft-fit-images", type=int, default=None,
                   help="els_soft: fit the widths on this many training images, a fixed random "
                        "subset (default all)")
    p.add_argument("--soft-fit-pixels", type=int, default=None,
                   help="els_soft: fit the widths on the cosine over this many query pixels, a "
                        "fixed random subset (default all; 128 on mnist5k)")
    p.add_argument("--solver", default="ddim", choices=["ddim", "heun"],
                   help="the sampler's solver for the network and every machine (default ddim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: a new one under ./runs); "
                   "an existing one is resumed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_reproduce)
    return p


def _cmd_reproduce(args) -> int:
    from els_jax.experiment import ReproduceConfig, reproduce

    # Checked here, before the run folder is made: a typo must not leave a run behind.
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such directory; pass the "
                                "--workdir of an `els-jax train` run, or leave --checkpoint "
                                "out to use the shipped network or train one")
    cfg = ReproduceConfig(
        dataset=args.dataset, image_size=args.image_size, max_examples=args.max_examples,
        data_dir=args.data_dir, arch=args.arch, padding=args.padding,
        conditional=args.conditional, checkpoint=args.checkpoint,
        train=None if args.train_steps is None else {"steps": args.train_steps},
        n_seeds=args.seeds, calib_seeds=args.calib_seeds, machine_steps=args.machine_steps,
        network_steps=args.network_steps, candidates=args.candidates, seed=args.seed,
        t_max=args.t_max, compare_t_max=args.compare_t_max, retrain=args.retrain,
        families=args.families, calib_neighbours=args.calib_neighbours,
        side_families=args.side_families,
        soft_steps=args.soft_steps, soft_method=args.soft_method,
        soft_fit_images=args.soft_fit_images,
        soft_fit_pixels=args.soft_fit_pixels, soft_lr=args.soft_lr, solver=args.solver)
    out = args.out or _new_run_dir(f"reproduce-{args.dataset}-{args.arch}-{args.padding}")
    print(f"els-jax reproduce → {out}", flush=True)
    report = reproduce(cfg, out, progress=not args.no_progress)
    keys = ("median_r2", "median_R2", "frac_els_beats_is", "scales", "t_max", "by_t_max",
            "network", "n_seeds", "elapsed_s")
    print(json.dumps({k: report[k] for k in keys} | {"out": out}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# els-jax mosaic


def _add_mosaic_subcommand(sub):
    p = sub.add_parser(
        "mosaic", help="show which training patches each pixel of an ELS (and network) sample "
                       "came from: source maps, top source images, entropy over time")
    p.add_argument("--run", default=None, help="a reproduce run folder: uses its network, "
                   "data set, padding, calibrated scales and seeds")
    p.add_argument("--dataset", default="digits", help="without --run: the training set")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--scales", type=_odd_sizes, default=(3,),
                   help="without --run: one patch size, or one per step (index 0 = last step)")
    p.add_argument("--boundary", default="zeros", choices=["zeros", "circular"])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--t-query", type=float, default=0.02,
                   help="small t at which a final image is explained by its candidates")
    p.add_argument("--out", default=None, help="output folder (default RUN/mosaic or ./runs/...)")
    p.set_defaults(func=_cmd_mosaic)
    return p


def _cmd_mosaic(args) -> int:
    import numpy as np

    import els_jax as ej
    from els_jax.experiment import seed_noise
    from els_jax.experiment.mosaic import mosaic_run

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    network_eps, network_steps, seed_base = None, None, 0
    if args.run:
        for name, what in (("config.json", "not a reproduce run folder; pass the --out of an "
                                           "`els-jax reproduce` run"),
                           ("scales.json", "its calibration has not finished; resume it with "
                                           f"`els-jax reproduce --out {args.run}`")):
            if not os.path.isfile(os.path.join(args.run, name)):
                raise FileNotFoundError(f"--run {args.run}: no {name}: {what}")
        with open(os.path.join(args.run, "config.json")) as f:
            run_cfg = json.load(f)
        with open(os.path.join(args.run, "scales.json")) as f:
            scales = json.load(f)["els"]["scales"]
        model, params, tcfg = ej.load_trained(run_cfg.get("checkpoint") or
                                              os.path.join(args.run, "network"))
        if getattr(model, "num_classes", None) is not None:
            raise ValueError(f"--run {args.run} is class-conditional, which mosaic does not "
                             "support yet; use an unconditional run")
        images, _ = ej.load_dataset(tcfg.dataset, data_dir=args.data_dir or tcfg.data_dir,
                                    image_size=tcfg.image_size, max_examples=tcfg.max_examples)
        boundary, seed_base = tcfg.padding, run_cfg.get("seed", 0)
        network_eps, network_steps = ej.make_network(model, params), run_cfg.get("network_steps")
        out = args.out or os.path.join(args.run, "mosaic")
    else:
        images, _ = ej.load_dataset(args.dataset, data_dir=args.data_dir,
                                    image_size=args.image_size)
        scales = args.scales[0] if len(args.scales) == 1 else list(args.scales)
        boundary = args.boundary
        out = args.out or _new_run_dir(f"mosaic-{args.dataset}")
    x_T = seed_noise(seed_base, seeds, np.asarray(images).shape[1:])
    info = mosaic_run(images, x_T, scales, boundary=boundary, network_eps=network_eps,
                      network_steps=network_steps, t_query=args.t_query, out=out, seeds=seeds)
    print(json.dumps({"out": out, "creativity": info["creativity"]}))
    return 0


# ---------------------------------------------------------------------------------------------
# Argument types (a bad value: argparse's usage + error, exit status 2)


def _times(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated times, got {text!r}")
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"times must lie in (0, 1], got {text!r}")
    return values


def _per_step(text: str, kind, what: str):
    """One value, or one per step (comma-separated, index 0 = the last step), parsed by
    ``kind``; whether each is in range is the machine's to say (one line, not argparse's
    usage)."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} or comma-separated {what}s, got "
                                         f"{text!r}")
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    return values[0] if len(values) == 1 else values


def _sigmas(text: str) -> float | tuple[float, ...]:
    """One window width, or one per step."""
    return _per_step(text, float, "width")


def _one_or_per_step_sizes(text: str) -> int | tuple[int, ...]:
    """One patch size, or one per step (odd and fitting the images: the machine checks)."""
    return _per_step(text, int, "patch size")


def _odd_sizes(text: str) -> tuple[int, ...]:
    sizes = _per_step(text, int, "patch size")
    sizes = sizes if isinstance(sizes, tuple) else (sizes,)
    if any(k < 1 or k % 2 == 0 for k in sizes):
        raise argparse.ArgumentTypeError(f"patch sizes must be odd and positive, got {text!r}")
    return sizes


def _neighbours(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count ≥ 0 or 'all', got {text!r}")
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count ≥ 0 or 'all', got {text!r}")
    return n


def _names(text: str) -> tuple[str, ...]:
    from els_jax.experiment import MACHINE_NAMES

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in MACHINE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown families {unknown}; choose from {','.join(MACHINE_NAMES)}")
    return names


# ---------------------------------------------------------------------------------------------
# The parser and the entry point

_DEBUG_HELP = "on an error, show the full traceback instead of one line"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="els-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sample_subcommand(sub)
    add_train_subcommand(sub)
    _add_reproduce_subcommand(sub)
    _add_mosaic_subcommand(sub)
    for p in sub.choices.values():
        # Also after the subcommand; SUPPRESS: left out there, it keeps the global value.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=_DEBUG_HELP)
    return parser


# What a user can fix: the library's input checks raise ValueError, and FileNotFoundError for
# what is missing (no such data file or config file, a TFDS set not prepared offline:
# ``core.data.DatasetUnavailableError``, a workdir without config.json or checkpoint).
USER_ERRORS = (ValueError, FileNotFoundError)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def is_user_error(err: BaseException) -> bool:
    """True for a ``USER_ERRORS`` exception that els_jax raised on purpose: the innermost
    frame of its traceback is a ``raise`` statement in els_jax's own code, i.e. one of its
    input checks, whose message is written for the user. The same types raised anywhere else
    (numpy, jax, a builtin called by els_jax, e.g. a failed reshape) are bugs: their
    traceback is shown."""
    if not isinstance(err, USER_ERRORS):
        return False
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not filename.startswith(_PACKAGE_DIR + os.sep):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache in ``$ELS_JAX_CACHE/xla`` (default
    ``~/.cache/els_jax/xla``, beside the engine choices and the kernel) for this process:
    a second run of a command compiles nothing it compiled before (every machine's patch
    sizes, the network's step, the calibration), which is most of a small run's wall time.
    ``ELS_JAX_COMPILE_CACHE=0`` leaves it off. Returns the directory, or None."""
    if os.environ.get("ELS_JAX_COMPILE_CACHE", "1") == "0":
        return None
    import jax

    from els_jax.core.cachedir import cache_dir

    root = cache_dir() / "xla"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:                        # a read-only home: run without the cache
        return None
    jax.config.update("jax_compilation_cache_dir", str(root))
    # Every executable, however quick to compile (the default keeps only those that took
    # ≥ 1 s): a sample compiles ~65 programs, most in 5–40 ms, and compiling them again cost
    # 1.3 s of a 9 s warm ``els-jax sample``; loading them costs ~0.2 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(root)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is not None:
        enable_compilation_cache()
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug or not is_user_error(err):
            raise
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        sys.stdout.flush()
        print(f"els-jax: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
