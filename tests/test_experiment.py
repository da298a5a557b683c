"""Calibration, metrics and the reproduce pipeline (docs/theory.md §4)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.experiment import calibration as cal
from els_jax.experiment import metrics
from els_jax.experiment import compare
from els_jax.experiment import config as conf
from els_jax.experiment.pipeline import reproduce
from els_jax.experiment.report import _markdown
from els_jax.experiment.seeds import seed_noise


# ----------------------------------------------------------------------------- metrics

def test_metrics_match_hand_computation():
    y = np.array([[1.0, 2.0, 3.0, 4.0]])
    # p = 2y: perfectly correlated, but far off in value.
    # R² = 1 − Σ(y − 2y)² / Σ(y − 2.5)² = 1 − (1 + 4 + 9 + 16) / 5 = −5.
    out = metrics.compare_images(y, 2 * y)
    assert out["r"][0] == pytest.approx(1.0)
    assert out["R2"][0] == pytest.approx(-5.0)
    # p = [1, 2, 3, 5]: r = cov / (sd_y sd_p) with centred y = [-1.5, -.5, .5, 1.5],
    # centred p = [-1.75, -.75, .25, 2.25]: Σ y p = 2.625 + .375 + .125 + 3.375 = 6.5,
    # Σ y² = 5, Σ p² = 3.0625 + .5625 + .0625 + 5.0625 = 8.75 → r = 6.5 / sqrt(43.75).
    # R² = 1 − 1 / 5 = 0.8.
    p = np.array([[1.0, 2.0, 3.0, 5.0]])
    out = metrics.compare_images(y, p)
    assert out["r"][0] == pytest.approx(6.5 / np.sqrt(43.75))
    assert out["r2"][0] == pytest.approx(6.5**2 / 43.75)
    assert out["R2"][0] == pytest.approx(0.8)


def test_metrics_per_image_against_numpy_corrcoef():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(5, 4, 4, 1))
    p = y + 0.5 * rng.normal(size=y.shape)
    r = metrics.pearson_r(y, p)
    for s in range(5):
        assert r[s] == pytest.approx(np.corrcoef(y[s].ravel(), p[s].ravel())[0, 1])
    # A constant image carries no linear relation: r = 0, never NaN.
    assert metrics.pearson_r(np.ones((1, 4)), np.arange(4.0)[None])[0] == 0.0
    with pytest.raises(ValueError):
        metrics.pearson_r(y, p[:, :2])


def test_bootstrap_and_summary():
    med, lo, hi = metrics.bootstrap_median([0.5] * 10)
    assert (med, lo, hi) == (0.5, 0.5, 0.5)
    v = np.linspace(0, 1, 101)
    med, lo, hi = metrics.bootstrap_median(v)
    assert med == pytest.approx(0.5) and lo < 0.5 < hi and hi - lo < 0.3
    per_seed = {"els": {"r": np.array([.9, .8, .95]), "r2": np.array([.81, .64, .9025]),
                        "R2": np.array([.8, .6, .9])},
                "is": {"r": np.array([.5, .9, .1]), "r2": np.array([.25, .81, .01]),
                       "R2": np.array([.2, .8, .0])}}
    s = metrics.summarize(per_seed)
    assert s["median_r2"] == {"els": pytest.approx(.81), "is": pytest.approx(.25)}
    assert s["frac_els_beats_is"] == pytest.approx(2 / 3)


def test_median_odd_rounds_to_odd_sizes():
    assert list(cal.median_odd(np.array([[3, 5], [3, 3], [5, 7], [3, 7], [9, 9]]))) == \
        [5, 3, 7, 5, 9]
    assert list(cal.median_odd(np.array([[3, 3, 5, 7], [3, 3, 3, 11]]))) == [5, 3]


# ----------------------------------------------------------------------------- calibration

@pytest.fixture(scope="module")
def digits_small():
    images, labels = ej.load_dataset("digits", max_examples=96)
    return np.asarray(images), np.asarray(labels)


@pytest.mark.parametrize("kind,boundary,k_true", [("els", "zeros", 5), ("els", "circular", 3),
                                                   ("local", "zeros", 5)])
def test_calibration_recovers_the_patch_size_of_a_machine(digits_small, kind, boundary, k_true):
    """Self-consistency: if the 'network' is itself a machine of size k, calibration says k."""
    images, _ = digits_small
    teacher = ej.make_machine(kind, images, scales=k_true, boundary=boundary)
    machines = cal.candidate_machines(kind, images, (3, 5, 7), boundary=boundary)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (3,) + images.shape[1:])
    times = ej.uniform_times(6)
    c = cal.calibrate(teacher, machines, x_T, times)
    assert c.scales == (k_true,) * 6
    assert c.best.shape == (6, 3)
    # The teacher's own size has cosine 1 at every step; the others are below.
    j = c.candidates.index(k_true)
    np.testing.assert_allclose(c.cosine[:, j], 1.0, atol=1e-5)


def test_calibration_neighbour_search_follows_a_moving_size_with_fewer_calls(digits_small):
    """A teacher whose size shrinks by one place per step: searching ±1 place around the last
    step's best finds the same sizes as trying all, with fewer machine calls; the sizes not
    tried are NaN."""
    images, _ = digits_small
    teacher = ej.make_machine("els", images, scales=(3, 3, 5, 5, 7, 9), boundary="zeros")
    calls = {}

    def counted(k, fn):
        def eps(x, t, i):
            calls[k] = calls.get(k, 0) + 1
            return fn(x, t, i)
        return eps

    machines = {k: counted(k, fn) for k, fn in
                cal.candidate_machines("els", images, (3, 5, 7, 9), boundary="zeros").items()}
    x_T = jax.random.normal(jax.random.PRNGKey(4), (2,) + images.shape[1:])
    times = ej.uniform_times(6)
    full = cal.calibrate(teacher, machines, x_T, times)
    n_full = sum(calls.values())
    calls.clear()
    near = cal.calibrate(teacher, machines, x_T, times, neighbours=1)
    assert full.scales == near.scales == (3, 3, 5, 5, 7, 9)
    np.testing.assert_array_equal(full.best, near.best)
    assert n_full == 6 * 4 and sum(calls.values()) < n_full
    # step 0 tries all; best 9 → step 1 tries 7, 9 only; then 5–9, 3–7, 3–7, 3–5.
    assert [calls[k] for k in (3, 5, 7, 9)] == [4, 5, 5, 3]
    assert np.isnan(near.cosine[1, :2]).all() and not np.isnan(near.cosine[1, 2:]).any()
    with pytest.raises(ValueError, match="neighbours"):
        cal.calibrate(teacher, machines, x_T, times, neighbours=-1)


def test_sample_machine_groups_seeds_by_label(digits_small):
    """Conditional: each seed is sampled by the machine restricted to its label's images."""
    images, labels = digits_small
    x_T = jax.random.normal(jax.random.PRNGKey(2), (4,) + images.shape[1:])
    seed_lab = np.array([1, 0, 1, 0])
    times = ej.uniform_times(3)
    res, single = compare.sample_machine("els", images, labels, x_T, seed_lab, times,
                                         scales=3, boundary="zeros",
                                         schedule=ej.schedules.cosine())
    assert single is None
    for c in (0, 1):
        idx = np.flatnonzero(seed_lab == c)
        ref = ej.sample(ej.make_machine("els", images, scales=3, boundary="zeros",
                                        mask=labels == c), x_T[idx], times)
        np.testing.assert_allclose(res.x0[idx], np.asarray(ref), atol=1e-5)


# ----------------------------------------------------------------------------- pipeline

TINY = conf.ReproduceConfig(
    max_examples=256, n_seeds=3, calib_seeds=2, machine_steps=4, network_steps=6,
    candidates=(3, 5), soft_steps=5,
    train=dict(steps=10, channels=8, depth=1, batch_size=64, checkpoint_every=5, log_every=5,
               ema=None))


def test_reproduce_end_to_end_and_resume(tmp_path):
    out = str(tmp_path / "run")
    report = reproduce(TINY, out, progress=False)
    for name in ("config.json", "scales.json", "samples.npz", "report.json", "report.md",
                 "figures/grid.png", "figures/scatter_els_vs_is.png", "figures/scales.png",
                 "figures/agreement.png", "network/DONE"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "report.json")) as f:
        saved = json.load(f)
    for key in ("median_r", "median_r2", "median_R2"):
        assert set(saved[key]) == set(conf.MACHINE_NAMES) >= {"els", "ls", "is", "gaussian",
                                                               "nearest", "pca_locality",
                                                               "els_soft"}
        assert all(np.isfinite(v) for v in saved[key].values())
    assert all(0.0 <= v <= 1.0 for v in saved["median_r2"].values())
    assert saved["n_seeds"] == 3 and saved["elapsed_s"] > 0
    assert len(saved["scales"]["els"]) == 4 and set(saved["scales"]["els"]) <= {3, 5}
    assert 0.0 <= saved["frac_els_beats_is"] <= 1.0
    # els_soft: one fitted width per step on the widest calibrated ELS support, each fit no
    # worse than its start (the Gaussian matching that step's ELS size).
    soft = saved["els_soft"]
    assert soft["k_max"] == max(saved["scales"]["els"]) and len(soft["sigmas"]) == 4
    assert all(s > 0 for s in soft["sigmas"])
    assert all(a >= b - 1e-6 for a, b in zip(soft["cosine_after"], soft["cosine_before"]))

    # The stored per-seed metrics are the metrics of the stored images.
    s = np.load(os.path.join(out, "samples.npz"))
    np.testing.assert_allclose(s["r2_els"], metrics.r_squared(s["network"], s["els"]))
    # Every model started from the same noise, labels and (machines) grid: checked, then a
    # tampered part must be refused.
    parts = {n: dict(np.load(os.path.join(out, "parts", f"{n}.npz")))
             for n in ("network",) + conf.MACHINE_NAMES}
    np.testing.assert_array_equal(parts["network"]["x_T"], parts["els"]["x_T"])
    # The default start is the authors' (n − 1)/n = 0.75 for 4 machine steps (docs/theory.md §8), for
    # the network too; t_max = 1 is compared side by side from the same seeds and scales.
    assert saved["t_max"] == 0.75 and set(saved["by_t_max"]) == {"0.75", "1"}
    np.testing.assert_allclose(parts["els"]["times"], ej.uniform_times(4, t_max=0.75))
    np.testing.assert_allclose(parts["network"]["times"], ej.uniform_times(6, t_max=0.75))
    side = {n: dict(np.load(os.path.join(out, "parts", "t_max=1", f"{n}.npz")))
            for n in ("network", "els", "ls", "is")}
    np.testing.assert_allclose(side["els"]["times"], ej.uniform_times(4))
    np.testing.assert_array_equal(side["network"]["x_T"], parts["network"]["x_T"])
    assert saved["by_t_max"]["1"]["median_r2"]["els"] == pytest.approx(
        float(np.median(metrics.r_squared(side["network"]["x0"], side["els"]["x0"]))))
    assert saved["by_t_max"]["0.75"]["median_r2"] == saved["median_r2"]
    # PCA-locality's masks: their median size per step, each mask at least its own pixel, at
    # most every pixel, recomputed here from the machine's own masks at the last step.
    sizes = saved["pca_locality_mask_median"]
    assert sizes["times"] == saved["single_step"]["times"] and len(sizes["median"]) == 4
    assert all(1 <= v <= 8 * 8 for v in sizes["median"])
    from els_jax.machines import gaussian as gaussian_lib, pca_locality as pca_lib
    imgs, _ = ej.load_dataset("digits", max_examples=256)
    c = ej.schedules.query_coefficients(saved["single_step"]["times"][-1], 1, "cosine")
    m_t = pca_lib.locality_mask_at(gaussian_lib.fit_gaussian(jnp.asarray(imgs)), c.a[0], c.b2[0],
                                   jnp.float32(pca_lib.DEFAULT_TAU))
    assert sizes["median"][-1] == float(np.median(pca_lib.mask_sizes(m_t)))
    # Single-step agreement: one value per step and family, R² ≤ 1, MSE ≥ 0.
    for name in conf.MACHINE_NAMES:
        assert len(saved["single_step"]["R2"][name]) == 4
        assert all(v <= 1.0 for v in saved["single_step"]["R2"][name])
        assert all(v >= 0.0 for v in saved["single_step"]["mse"][name])
    parts = {n: {k: v for k, v in p.items() if not k.startswith("single_step")}
             for n, p in parts.items()}
    compare.check_same_inputs(parts, ej.uniform_times(4, t_max=0.75))
    bad = dict(parts)
    bad["is"] = dict(parts["is"], x_T=parts["is"]["x_T"] + 1e-3)
    with pytest.raises(AssertionError, match="x_T"):
        compare.check_same_inputs(bad, ej.uniform_times(4, t_max=0.75))
    bad = dict(parts)
    bad["ls"] = dict(parts["ls"], times=np.asarray(ej.uniform_times(4)))
    with pytest.raises(AssertionError, match="time grid"):
        compare.check_same_inputs(bad, ej.uniform_times(4, t_max=0.75))

    # Resume: an interrupted comparison (one part lost) is redone; nothing else is, and the
    # network is not retrained.
    os.remove(os.path.join(out, "parts", "ls.npz"))
    mtime = os.path.getmtime(os.path.join(out, "scales.json"))
    again = reproduce(TINY, out, progress=False)
    assert os.path.getmtime(os.path.join(out, "scales.json")) == mtime
    with open(os.path.join(out, "timings.json")) as f:
        timings = json.load(f)
    assert timings["train"] == saved["timings_s"]["train"]
    assert again["median_r2"] == pytest.approx(report["median_r2"], abs=1e-6)

    # The gather script tabulates the run.
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "gather", os.path.join(os.path.dirname(__file__), "..", "experiments", "gather.py"))
    gather = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gather)
    (row,) = gather.rows(gather.find_reports([str(tmp_path)]))
    assert row["dataset"] == "digits" and row["r2_els"] == pytest.approx(report["median_r2"]["els"])
    assert "| digits |" in gather.markdown([row])

    # Another configuration in the same folder is refused, not mixed in.
    import dataclasses
    with pytest.raises(ValueError, match="another configuration"):
        reproduce(dataclasses.replace(TINY, n_seeds=4), out, progress=False)

    # A subset of the families (the cheap run at 32×32): ELS and IS always run, LS is neither
    # calibrated nor sampled, and the numbers are those of the full run (same network, seeds,
    # calibration).
    # The side start samples only ``side_families`` (els and is always); report.md marks the
    # others' side column with a dash.
    sub = reproduce(dataclasses.replace(TINY, families=("gaussian",), side_families=(),
                                        checkpoint=os.path.join(out, "network")),
                    str(tmp_path / "subset"), progress=False)
    assert sub["families"] == ["els", "is", "gaussian"] and set(sub["scales"]) == {"els"}
    assert set(os.listdir(tmp_path / "subset" / "parts")) == {
        "network.npz", "els.npz", "is.npz", "gaussian.npz", "t_max=1"}
    assert set(os.listdir(tmp_path / "subset" / "parts" / "t_max=1")) == {
        "network.npz", "els.npz", "is.npz"}
    assert set(sub["by_t_max"]["1"]["median_r2"]) == {"els", "is"}
    for name in sub["families"]:
        assert sub["median_r2"][name] == pytest.approx(saved["median_r2"][name], abs=1e-5)
    for name in ("els", "is"):
        assert sub["by_t_max"]["1"]["median_r2"][name] == pytest.approx(
            saved["by_t_max"]["1"]["median_r2"][name], abs=1e-5)
    md = (tmp_path / "subset" / "report.md").read_text()
    assert [ln for ln in md.splitlines() if ln.startswith("| GAUSSIAN")][0].count("| – |") == 1
    with pytest.raises(ValueError, match="unknown families"):
        dataclasses.replace(TINY, families=("wiener",)).validate()


def test_reproduce_holds_uint8_training_sets_as_uint8_and_reports_the_same(tmp_path,
                                                                          monkeypatch):
    """A set stored as uint8 at its own size reaches every family as uint8 (docs/theory.md
    §9.2): the report is the one the float32 set gives, to the last digit."""
    import dataclasses
    from els_jax.core import data as data_lib
    from els_jax.machines import factory

    pix, _ = ej.load_dataset("digits", max_examples=200)
    pix = np.round((pix + 1.0) * 127.5).astype(np.uint8)             # whole pixels 0…255
    path = str(tmp_path / "u8.npz")
    np.savez(path, images=pix, labels=np.arange(200) % 10)
    cfg = dataclasses.replace(TINY, dataset=path, max_examples=None, families=("gaussian",),
                              side_families=(), n_seeds=2, calib_seeds=1, candidates=(3,))
    seen = []
    make = factory.make_machine

    def spy(kind, images, *args, **kwargs):
        seen.append((kind, np.dtype(images.dtype)))
        return make(kind, images, *args, **kwargs)
    monkeypatch.setattr(factory, "make_machine", spy)
    held = reproduce(cfg, str(tmp_path / "u8"), progress=False)
    assert {kind for kind, _ in seen} >= {"els", "ideal", "gaussian"}
    assert all(dtype == np.uint8 for _, dtype in seen)

    load = data_lib.load_dataset
    monkeypatch.setattr(data_lib, "load_dataset",
                        lambda *a, **kw: load(*a, **{**kw, "keep_uint8": False}))
    seen.clear()
    as_float = reproduce(dataclasses.replace(cfg, checkpoint=str(tmp_path / "u8" / "network")),
                         str(tmp_path / "f32"), progress=False)
    assert seen and all(dtype == np.float32 for _, dtype in seen)
    assert held["scales"] == as_float["scales"]
    assert held["median_r2"] == as_float["median_r2"]
    for name in ("els", "is", "gaussian"):
        a, b = (np.load(os.path.join(tmp_path, run, "parts", f"{name}.npz"))["x0"]
                for run in ("u8", "f32"))
        np.testing.assert_array_equal(a, b)


def test_reproduce_rejects_bad_config():
    import dataclasses
    with pytest.raises(ValueError, match="odd"):
        dataclasses.replace(TINY, candidates=(3, 4)).validate()
    with pytest.raises(ValueError, match="n_seeds"):
        dataclasses.replace(TINY, n_seeds=1).validate()


def test_single_step_agreement_is_perfect_when_the_network_is_the_machine(digits_small):
    # The single-step metric applies the "network" to the machine's own x_t at every step:
    # with the machine itself in the network's place it must be R² = 1 and MSE = 0 at every
    # step (a misaligned step or time would break this).
    images, labels = digits_small
    x_T = seed_noise(0, [0, 1, 2], images.shape[1:])
    times = ej.uniform_times(4, t_max=0.75)
    machine = ej.make_machine("els", images, scales=[3, 3, 5, 5], boundary="zeros")
    _, single = compare.sample_machine("els", images, labels, x_T, None, times,
                                       scales=[3, 3, 5, 5], boundary="zeros",
                                       schedule=ej.schedules.cosine(), network=lambda y: machine)
    np.testing.assert_allclose(single["R2"], 1.0, atol=1e-5)
    np.testing.assert_allclose(single["mse"], 0.0, atol=1e-9)
    # Another machine in the network's place agrees less, and worst at the noisy start.
    _, other = compare.sample_machine("els", images, labels, x_T, None, times,
                                      scales=[3, 3, 5, 5], boundary="zeros",
                                      schedule=ej.schedules.cosine(),
                                      network=lambda y: ej.make_machine("ideal", images))
    assert np.all(other["mse"] > 1e-6) and np.all(other["R2"] < 1.0)


def test_shipped_network_is_used_only_for_the_default_training(tmp_path, monkeypatch):
    import dataclasses
    import warnings

    cfg = conf.ReproduceConfig()
    ship = tmp_path / "digits_resnet_zeros"
    ship.mkdir()
    monkeypatch.setattr(conf, "CHECKPOINTS_DIR", tmp_path)
    with open(ship / "config.json", "w") as f:
        json.dump(conf.digits_train_config().to_dict(), f)
    assert conf.shipped_checkpoint(cfg) == str(ship)
    for changed in (dict(retrain=True), dict(train={"steps": 10}), dict(padding="circular"),
                    dict(max_examples=100), dict(checkpoint="elsewhere")):
        assert conf.shipped_checkpoint(dataclasses.replace(cfg, **changed)) is None, changed
    # A shipped network trained with other settings is not silently used.
    with open(ship / "config.json", "w") as f:
        json.dump(conf.digits_train_config(lr=1e-3).to_dict(), f)
    with pytest.warns(RuntimeWarning, match="other settings"):
        assert conf.shipped_checkpoint(cfg) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert conf.shipped_checkpoint(dataclasses.replace(cfg, dataset="mnist5k")) is None


def test_authors_start_and_side_by_side_starts():
    import dataclasses
    cfg = conf.ReproduceConfig(machine_steps=20).resolved()
    assert cfg.start == pytest.approx(0.95) and cfg.starts() == [pytest.approx(0.95), 1.0]
    # mnist5k's default has no side start (issue 20's time budget); asked for, it runs.
    m5k = conf.ReproduceConfig(dataset="mnist5k", machine_steps=20)
    assert m5k.resolved().starts() == [pytest.approx(0.95)]
    assert dataclasses.replace(m5k, compare_t_max=(1.0,)).resolved().starts() == [
        pytest.approx(0.95), 1.0]
    cfg = dataclasses.replace(cfg, t_max=1.0, compare_t_max=(1.0, 0.9))
    assert cfg.starts() == [1.0, 0.9]
    with pytest.raises(ValueError, match="t_max"):
        dataclasses.replace(cfg, compare_t_max=(1.5,)).validate()


def test_cli_parses_families_and_calibration_search():
    from els_jax import cli
    args = cli.build_parser().parse_args(
        ["reproduce", "--families", "ls,gaussian", "--calib-neighbours", "all"])
    assert args.families == ("ls", "gaussian") and args.calib_neighbours is None
    args = cli.build_parser().parse_args(["reproduce"])
    assert args.families is None
    assert args.calib_neighbours == conf.ReproduceConfig().calib_neighbours
    for bad in (["--families", "wiener"], ["--calib-neighbours", "-1"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["reproduce"] + bad)


def test_dataset_defaults_fill_only_what_is_left_open(tmp_path):
    import dataclasses
    big = conf.ReproduceConfig(dataset="mnist5k").resolved()
    assert big.calib_seeds == 4 and big.family_names() == conf.MACHINE_NAMES
    assert (big.soft_method, big.soft_steps, big.soft_fit_pixels, big.soft_fit_images) == (
        "search", 5, 128, None)
    small = conf.ReproduceConfig().resolved()
    assert small.calib_seeds == 8 and small.family_names() == conf.MACHINE_NAMES
    assert (small.soft_method, small.soft_steps, small.soft_lr, small.soft_fit_pixels) == (
        "search", 5, 0.1, None)
    adam = conf.ReproduceConfig(soft_method="adam").resolved()
    assert (adam.soft_method, adam.soft_steps) == ("adam", 25)
    with pytest.raises(ValueError, match="soft_method"):
        conf.ReproduceConfig(soft_method="lbfgs").validate()
    assert big.side_family_names() == ("els", "ls", "is")
    assert small.side_family_names() == small.family_names()
    assert dataclasses.replace(small, families=("gaussian",), side_families=("ls",)
                               ).side_family_names() == ("els", "is")
    asked = dataclasses.replace(big, calib_seeds=None, soft_steps=3, soft_fit_pixels=None,
                                families=("els_soft",)).resolved()
    assert asked.family_names() == ("els", "is", "els_soft") and asked.calib_seeds == 4
    assert (asked.soft_steps, asked.soft_fit_pixels) == (3, 128)
    # With a checkpoint, the network's own data set decides (read from its config.json).
    ckpt = tmp_path / "net"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"dataset": "mnist5k"}))
    assert conf.ReproduceConfig(checkpoint=str(ckpt)).resolved().calib_seeds == 4


def test_every_shipped_network_is_the_one_reproduce_would_train():
    """The repository's checkpoints match today's default training (a changed default would
    otherwise silently retrain), and they load."""
    import warnings
    shipped = [key for key, name in conf._SHIPPED.items()
               if (conf.CHECKPOINTS_DIR / name / "config.json").exists()]
    assert {("digits", "resnet", "zeros"), ("mnist5k", "resnet", "zeros"),
            ("mnist5k", "resnet", "circular"), ("mnist5k", "unet", "zeros")} <= set(shipped)
    for dataset, arch, padding in shipped:
        cfg = conf.ReproduceConfig(dataset=dataset, arch=arch, padding=padding)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            path = conf.shipped_checkpoint(cfg)
        model, params, tcfg = ej.load_trained(path)
        assert (tcfg.dataset, tcfg.arch, tcfg.padding) == (dataset, arch, padding)
        if arch == "resnet":
            assert ej.receptive_field(model) == 17                      # docs/theory.md §5
        x = np.zeros((1,) + tuple(tcfg.image_shape), np.float32)
        eps = ej.make_network(model, params)(jnp.asarray(x), jnp.float32(0.5), 0)
        assert eps.shape == x.shape and np.isfinite(np.asarray(eps)).all()


@pytest.mark.parametrize("starts", [("0.95",), ("0.95", "1")])
def test_report_table_is_well_formed_with_and_without_other_starts(starts):
    """report.md's table has as many cells in every row as in its header, with or without
    the side-by-side starts (an empty trailing column broke it with --compare-t-max '')."""
    fam = ("els", "is")
    per = {n: 0.5 for n in fam}
    report = dict(dataset="d", arch="resnet", boundary="zeros", conditional=False, network="n",
                  n_seeds=2, machine_steps=4, network_steps=6, t_max=0.95, t_max_protocol="p",
                  calib_seeds=2, elapsed_s=1.0, families=fam, ci_r2={n: (0.4, 0.6) for n in fam},
                  median_r=per, median_r2=per, median_R2=per, frac_els_beats_is=1.0,
                  scales={"els": [3, 3]}, els_soft=None,
                  single_step={"R2": {"els": [0.5, 0.7], "is": [0.1, 0.2]}},
                  by_t_max={t: {"median_r2": per, "frac_els_beats_is": 1.0} for t in starts})
    figs = dict(grid="g.png", scatter="s.png", scales="c.png", agreement="a.png")
    rows = [ln for ln in _markdown(report, figs).splitlines() if ln.startswith("|")]
    cells = [ln.count("|") for ln in rows]
    assert len(rows) == 2 + len(fam) and len(set(cells)) == 1
    # family, r, r² (CI), R², r² per side start, the single-step R² averaged over steps
    assert cells[0] == 5 + len(starts) and "| |" not in rows[0]
    assert rows[2].endswith("| 0.600 |") and rows[3].endswith("| 0.150 |")


# ------------------------------------------------------------------ experiments/configs/*.py

# What every file in experiments/configs/ trains, written out in full (not through the library
# recipes it calls), so that a changed recipe shows here. The paper's runs (docs/theory.md §5): data
# set, architecture, padding, class-conditioning and extra fields per file; the shared recipe.
PAPER_RECIPE = dict(image_size=32, depth=6, batch_size=128, epochs=300, steps=None, lr=1e-4,
                    lr_decay=0.999965, weight_decay=0.0, ema=None, seed=0, checkpoint_every=5000)
PAPER_WIDTH = {"resnet": 256, "unet": (64, 128, 256)}
PAPER_RUNS = {
    "mnist_resnet_zeros": ("mnist", "resnet", "zeros", False, {}),
    "mnist_resnet_circular": ("mnist", "resnet", "circular", False, {}),
    "mnist_unet_zeros": ("mnist", "unet", "zeros", False, {}),
    "fashion_mnist_resnet_zeros": ("fashion_mnist", "resnet", "zeros", True, {}),
    "fashion_mnist_unet_zeros": ("fashion_mnist", "unet", "zeros", True, {}),
    "cifar10_resnet_zeros": ("cifar10", "resnet", "zeros", True, {}),
    "cifar10_resnet_circular": ("cifar10", "resnet", "circular", True, {}),
    "cifar10_unet_zeros": ("cifar10", "unet", "zeros", True, {}),
    "cifar10_unet_attention": ("cifar10", "unet", "zeros", True,
                               {"attention_resolutions": (16, 8)}),
    "celeb_a_resnet_zeros": ("celeb_a", "resnet", "zeros", False, {}),
    "celeb_a_unet_zeros": ("celeb_a", "unet", "zeros", False, {}),
}
# The CPU-sized runs on the embedded data sets (what `els-jax reproduce` trains).
CPU_RECIPE = dict(conditional=False, depth=6, batch_size=128, steps=3000, epochs=None,
                  ema=0.999, seed=0)
CPU_RUNS = {
    "digits_resnet": dict(dataset="digits", arch="resnet", padding="zeros", channels=64,
                          lr=5e-4, lr_decay=0.9997, checkpoint_every=500, log_every=100),
    **{f"mnist5k_{arch}_{padding}": dict(
        dataset="mnist5k", image_size=32, arch=arch, padding=padding, channels=width, lr=5e-4,
        lr_decay=0.9998, weight_decay=0.0, checkpoint_every=200, keep_checkpoints=2,
        log_every=50)
       for arch, padding, width in (("resnet", "zeros", 32), ("resnet", "circular", 32),
                                    ("unet", "zeros", (32, 64, 128)))},
}
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "configs")


def _expected_train_config(name):
    if name in PAPER_RUNS:
        dataset, arch, padding, conditional, extra = PAPER_RUNS[name]
        return ej.TrainConfig(dataset=dataset, arch=arch, padding=padding,
                              conditional=conditional, channels=PAPER_WIDTH[arch],
                              **PAPER_RECIPE, **extra)
    return ej.TrainConfig(**CPU_RECIPE, **CPU_RUNS[name])


def test_every_experiment_config_loads_by_path_and_trains_what_it_says():
    """Each experiments/configs/ file loads the way `els-jax train --config FILE` loads it
    (by path) and yields exactly its table entry; every file has an entry."""
    from els_jax.nets.train import load_config

    names = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py"))
    assert names == sorted({**PAPER_RUNS, **CPU_RUNS})
    for name in names:
        config = load_config(os.path.join(CONFIGS_DIR, f"{name}.py"))
        assert config == _expected_train_config(name), name
    # The library recipes are the ones the files call.
    assert conf.paper_train_config("cifar10", "unet", "zeros", True,
                                   attention_resolutions=(16, 8)) == \
        _expected_train_config("cifar10_unet_attention")
    assert conf.digits_train_config() == _expected_train_config("digits_resnet")
