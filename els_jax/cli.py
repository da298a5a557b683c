"""The ``els-jax`` command line. Thin: parses arguments and calls library functions.

    els-jax sample --dataset digits --machine ideal --num 16 --steps 20 --out runs/is
    els-jax train --config experiments/configs/digits_resnet.py --workdir runs/digits_resnet
    els-jax reproduce --dataset digits --seeds 32 --out runs/digits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _new_run_dir(prefix: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{prefix}-{stamp}")


def _cmd_sample(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import els_jax as ej
    from els_jax.plotting import save_image_grid

    images, labels = ej.load_dataset(args.dataset, data_dir=args.data_dir,
                                     image_size=args.image_size, max_examples=args.max_examples)
    mask = None
    if args.label is not None:
        mask = jnp.asarray(labels == args.label)
    schedule = ej.schedules.get(args.schedule)
    eps_fn = _machine_eps_fn(args, jnp.asarray(images), schedule, mask)
    key = jax.random.PRNGKey(args.seed)
    x_T = jax.random.normal(key, (args.num,) + images.shape[1:], jnp.float32)
    t0 = time.perf_counter()
    x0 = ej.sample(eps_fn, x_T, ej.uniform_times(args.steps), schedule=schedule, eta=args.eta,
                   key=jax.random.fold_in(key, 1), progress=True)
    x0 = np.asarray(jax.block_until_ready(x0))
    elapsed = time.perf_counter() - t0
    out = args.out or _new_run_dir(f"sample-{args.machine}")
    os.makedirs(out, exist_ok=True)
    # Nearest training image per sample: "is it new or memorised?" at a glance.
    d2 = ((x0.reshape(len(x0), -1)[:, None] - images.reshape(len(images), -1)[None]) ** 2).sum(-1)
    np.savez(os.path.join(out, "samples.npz"), samples=x0, x_T=np.asarray(x_T),
             times=np.asarray(ej.uniform_times(args.steps)), nearest_index=d2.argmin(1),
             nearest_dist=np.sqrt(d2.min(1)))
    save_image_grid(os.path.join(out, "samples.png"), x0,
                    title=f"{args.machine} machine, {args.dataset}, {args.steps} steps")
    summary = {"machine": args.machine, "dataset": args.dataset, "n_train": int(len(images)),
               "num": args.num, "steps": args.steps, "elapsed_s": round(elapsed, 3),
               "median_nearest_train_dist": float(np.median(np.sqrt(d2.min(1)))), "out": out}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0


def _machine_eps_fn(args, images, schedule, mask):
    import els_jax as ej

    if args.machine == "ideal":
        def eps_fn(x, t, i):
            return ej.score_to_eps(ej.ideal_score(x, t, images, schedule=schedule, mask=mask), t,
                                   schedule=schedule)
        return eps_fn
    make_machine = getattr(ej, "make_machine", None)
    if make_machine is None:
        raise SystemExit(f"machine {args.machine!r} is not available in this version")
    return make_machine(args.machine, images, scales=args.k, boundary=args.boundary,
                        schedule=schedule, mask=mask)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="els-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample from an analytic machine and write a PNG grid + .npz")
    p.add_argument("--dataset", default="digits", help="digits | mnist5k | mnist | fashion_mnist | cifar10 | celeb_a | path.npz")
    p.add_argument("--data-dir", default=None, help="prepared TFDS data dir (no downloads)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--machine", default="ideal", choices=["ideal", "equivariant", "local", "els"])
    p.add_argument("--k", type=int, default=3, help="patch size for local/els machines (odd)")
    p.add_argument("--boundary", default="zeros", choices=["zeros", "circular"])
    p.add_argument("--label", type=int, default=None, help="class-conditional: training label")
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eta", type=float, default=0.0, help="0 = DDIM, 1 = DDPM")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: a new one under ./runs)")
    p.set_defaults(func=_cmd_sample)

    from els_jax.train import add_train_subcommand
    add_train_subcommand(sub)

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
                        "authors' effective start (n-1)/n, 0.95 for 20 steps; SPEC §8)")
    p.add_argument("--compare-t-max", type=_times, default=(1.0,),
                   help="further starts reported side by side, e.g. 1 or 1,0.9 ('' for none; "
                        "default 1)")
    p.add_argument("--retrain", action="store_true",
                   help="train the network even if the repository ships one for this run "
                        "(experiments/checkpoints/)")
    p.add_argument("--candidates", type=_odd_sizes, default=None,
                   help="patch sizes for the calibration, e.g. 3,5,7 (default 3, 5, …, image size)")
    p.add_argument("--calib-neighbours", type=_neighbours, default=1,
                   help="after the first step, calibrate only the sizes within this many "
                        "places of the last step's best ('all' = every size; default 1)")
    p.add_argument("--families", type=_names, default=None,
                   help="families compared, e.g. els,ls,is,gaussian (default: all, but "
                        "els_soft not on mnist5k; els and is always run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: a new one under ./runs); "
                   "an existing one is resumed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_reproduce)

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
    return parser


def _cmd_mosaic(args) -> int:
    import numpy as np

    import els_jax as ej
    from els_jax.experiment import seed_noise
    from els_jax.mosaic import mosaic_run

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    network_eps, network_steps, seed_base = None, None, 0
    if args.run:
        with open(os.path.join(args.run, "config.json")) as f:
            run_cfg = json.load(f)
        with open(os.path.join(args.run, "scales.json")) as f:
            scales = json.load(f)["els"]["scales"]
        model, params, tcfg = ej.load_trained(run_cfg.get("checkpoint") or
                                              os.path.join(args.run, "network"))
        if getattr(model, "num_classes", None) is not None:
            raise SystemExit("mosaic does not support class-conditional runs yet")
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


def _times(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated times, got {text!r}")
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"times must lie in (0, 1], got {text!r}")
    return values


def _odd_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated odd sizes, got {text!r}")
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
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


def _cmd_reproduce(args) -> int:
    from els_jax.experiment import ReproduceConfig, reproduce

    cfg = ReproduceConfig(
        dataset=args.dataset, image_size=args.image_size, max_examples=args.max_examples,
        data_dir=args.data_dir, arch=args.arch, padding=args.padding,
        conditional=args.conditional, checkpoint=args.checkpoint,
        train=None if args.train_steps is None else {"steps": args.train_steps},
        n_seeds=args.seeds, calib_seeds=args.calib_seeds, machine_steps=args.machine_steps,
        network_steps=args.network_steps, candidates=args.candidates, seed=args.seed,
        t_max=args.t_max, compare_t_max=args.compare_t_max, retrain=args.retrain,
        families=args.families, calib_neighbours=args.calib_neighbours)
    out = args.out or _new_run_dir(f"reproduce-{args.dataset}-{args.arch}-{args.padding}")
    print(f"els-jax reproduce → {out}", flush=True)
    report = reproduce(cfg, out, progress=not args.no_progress)
    keys = ("median_r2", "median_R2", "frac_els_beats_is", "scales", "t_max", "by_t_max",
            "network", "n_seeds", "elapsed_s")
    print(json.dumps({k: report[k] for k in keys} | {"out": out}, indent=1))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
