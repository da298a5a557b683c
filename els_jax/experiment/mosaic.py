"""`els-jax mosaic`: the patch mosaic of ELS samples (and of a network's samples), drawn.

For each seed: the ELS sample; a colour-coded map of which training image each pixel came from
(the heaviest candidate at a small t, with the last step's patch size); the mosaic itself; the
training images that contribute most, with the contributing window centres marked; and the
posterior entropy over the trajectory. With a network, the same for the network's final image
(its output used as the query at the small t): which training patches the network recombined.
Numbers per sample (mosaic.json): distance to the nearest training image vs to the mosaic.
"""

from __future__ import annotations

import json
import os

import numpy as np

from els_jax.machines import factory as machine_lib
from els_jax.machines import posterior as pv
from els_jax.core import sampler
from els_jax.core import schedules as schedules_lib
from els_jax.core.data import held_images, unit_images

__all__ = ["mosaic_run"]


def _entropy_over_time(traj, times, machine, images, boundary, schedule, n_show):
    steps = np.unique(np.linspace(0, len(times) - 2, n_show).round().astype(int))
    maps = []
    for i in steps:
        p = pv.provenance(traj[i], times[i], images, kind="els", k=machine.patch_size(int(i)),
                          boundary=boundary, schedule=schedule, top_k=1)
        maps.append(np.asarray(p.entropy))
    return steps, np.stack(maps, 1)                       # [S, n_show, H, W]


def mosaic_run(images, x_T, scales, *, boundary="zeros", schedule=schedules_lib.Cosine(),
               network_eps=None, network_steps=None, t_query=0.02, out=".", seeds=None,
               n_entropy=4, top_sources=3, steps=20):
    """Samples ELS (and optionally a network) from x_T and writes mosaic.png / .json / .npz.

    Args:
      images: training set [N, H, W, C] (floats in [−1, 1] or uint8 pixels, kept as uint8);
        x_T: [S, H, W, C] noise (one row per seed).
      scales: the ELS scale list (index 0 = last step), or an int (then ``steps`` steps).
      network_eps: optional ``make_network(...)`` eps_fn: its final images are explained too.
      t_query: the small t at which a final image is used as the query of the provenance.
    Returns:
      dict with the per-sample creativity numbers (also in mosaic.json).
    """
    schedule = schedules_lib.get(schedule)
    # uint8 pixels stay uint8 (a float32 copy of CelebA's set is 2 GB): the machine, the
    # provenance and the distances read them a chunk at a time, the figure a few images.
    images = held_images(images)
    host = np.asarray(images)             # the distances and the figure read it on the host
    scale_list = [int(scales)] * steps if np.ndim(scales) == 0 else [int(k) for k in scales]
    times = sampler.uniform_times(len(scale_list))
    machine = machine_lib.make_machine("els", images, scales=scale_list, boundary=boundary,
                                       schedule=schedule, compile_for=x_T)
    res = sampler.sample(machine, x_T, times, schedule=schedule, return_trajectory=True)
    traj = np.asarray(res.trajectory)
    k_last = scale_list[0]
    rows = {"ELS": np.asarray(res.x0)}
    if network_eps is not None:
        net_times = sampler.uniform_times(network_steps or len(scale_list))
        rows["network"] = np.asarray(sampler.sample(network_eps, x_T, net_times,
                                                    schedule=schedule))
    steps, ent = _entropy_over_time(traj, np.asarray(times), machine, images, boundary,
                                    schedule, n_entropy)
    summary, provs = {}, {}
    for name, x in rows.items():
        p = pv.provenance(x, t_query, images, kind="els", k=k_last, boundary=boundary,
                          schedule=schedule, top_k=top_sources)
        provs[name] = p
        c = pv.creativity(x, host, p)
        summary[name] = {key: np.asarray(v).tolist() for key, v in c.items()}
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "mosaic.npz"), x_T=np.asarray(x_T), times=np.asarray(times),
             entropy_steps=steps, entropy=ent,
             **{f"{n}_{f}": np.asarray(getattr(provs[n], f)) for n in provs
                for f in ("image", "row", "col", "weight", "entropy", "x0")},
             **{f"{n}_sample": v for n, v in rows.items()})
    info = {"seeds": None if seeds is None else list(seeds), "scales": scale_list,
            "boundary": boundary, "t_query": t_query, "patch_size_at_query": k_last,
            "creativity": summary,
            "explain": "d_train: RMS distance to the nearest training image; d_mosaic: RMS "
                       "distance to the sample's own top-1 patch mosaic; n_sources: distinct "
                       "training images in the mosaic"}
    with open(os.path.join(out, "mosaic.json"), "w") as f:
        json.dump(info, f, indent=2)
    _figure(os.path.join(out, "mosaic.png"), host, rows, provs, steps, np.asarray(times),
            ent, seeds, summary)
    return info


def _figure(path, images, rows, provs, steps, times, ent, seeds, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    def show(ax, img, title=None, **kw):
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim == 2 and "cmap" not in kw:
            kw = dict(cmap="gray", vmin=-1, vmax=1, **kw)
        elif img.ndim == 3:
            img = np.clip((img + 1) / 2, 0, 1)
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title, fontsize=7)

    n_seeds = next(iter(rows.values())).shape[0]
    n_src = provs["ELS"].image.shape[-1]
    ncols = 3 + n_src + ent.shape[1]
    nrows = n_seeds * len(rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.45 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    r = 0
    for s in range(n_seeds):
        for name, x in rows.items():
            ax = axes[r]
            p = provs[name]
            src = np.asarray(p.image[s, ..., 0])
            cre = summary[name]
            label = f"seed {seeds[s] if seeds is not None else s}: {name}"
            show(ax[0], x[s], f"{label}\nd_train {cre['d_train'][s]:.2f}")
            # Colour = training image; the most used sources get distinct colours.
            uniq, counts = np.unique(src, return_counts=True)
            order = uniq[np.argsort(-counts)]
            colour_of = {n: i % 20 for i, n in enumerate(order)}
            coloured = cmap(np.vectorize(colour_of.get)(src))[..., :3]
            show(ax[1], coloured * 2 - 1, f"source image\n{len(uniq)} sources")
            show(ax[2], pv.mosaic_image(p, images)[s],
                 f"mosaic\nd_mosaic {cre['d_mosaic'][s]:.2f}")
            for j in range(n_src):
                a = ax[3 + j]
                if j >= len(order):
                    a.set_axis_off()
                    continue
                n = int(order[j])
                show(a, unit_images(images[n]), f"train #{n}")
                ys, xs = np.nonzero(src == n)
                for yy, xx in zip(ys, xs):          # centres of the windows taken from it
                    cy, cx = int(p.row[s, yy, xx, 0]), int(p.col[s, yy, xx, 0])
                    a.add_patch(mpatches.Rectangle((cx - 0.5, cy - 0.5), 1, 1, fill=False,
                                                   lw=0.8, ec=cmap(colour_of[n])))
            for j in range(ent.shape[1]):
                a = ax[3 + n_src + j]
                if name == "ELS":
                    show(a, ent[s, j], f"entropy t={times[steps[j]]:.2f}", cmap="magma",
                         vmin=0, vmax=max(1e-6, float(ent.max())))
                else:
                    a.set_axis_off()
            r += 1
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
