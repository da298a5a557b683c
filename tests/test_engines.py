"""The engine selector (els_jax.engines) with a fake timer: what it measures, what it caches on
disk, when it falls back to the static rule; and machines that report what runs and why."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.engines import autotune, native
from els_jax.engines import select as engines
from els_jax.engines import window as els_window
from els_jax.core import schedules
from tests import oracles


class FakeClock:
    """A timer that advances only when a probe call says how long it "took"."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Autotuning on, a fresh cache directory, an empty memory cache and a fake clock."""
    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "1")
    monkeypatch.setenv("ELS_JAX_CACHE", str(tmp_path))
    clock = FakeClock()
    monkeypatch.setattr(autotune, "_clock", clock)
    autotune.clear_memory_cache()
    jax.clear_caches()          # "auto" is resolved when a shape is first traced
    yield clock
    autotune.clear_memory_cache()
    jax.clear_caches()


def _probes(clock, seconds, log):
    """probes() for ``select``: engine e "takes" seconds[e] per call; calls are logged."""
    def call(name):
        def run():
            log.append(name)
            clock.now += seconds[name]
        return run
    return lambda: ({name: call(name) for name in seconds}, "fake probe", None)


SHAPE = {"k": 5, "C": 1, "H": 32, "W": 32, "N": 1024, "B": 1}


def test_select_measures_once_then_reuses_the_disk_cache(tuner, tmp_path):
    log = []
    choice = autotune.select("els", SHAPE, ("window", "row", "native"), "native", "static",
                            _probes(tuner, {"window": 3.0, "row": 2.0, "native": 5.0}, log))
    assert choice.engine == "row" and "measured" in choice.reason
    assert choice.times == {"window": 3.0, "row": 2.0, "native": 5.0}
    # One untimed call each, then rounds in alternation; the fake calls are long (10 s per
    # round), so the budget stops it after the minimum of two rounds.
    assert log == ["window", "row", "native"] * 3
    entry = next(iter(json.loads((tmp_path / "engines.json").read_text()).values()))
    assert entry["engine"] == "row" and entry["fields"]["k"] == 5
    assert entry["fields"]["simd"] == autotune.cpu_info()["simd"]
    # A new process (memory cache cleared) reads the winner from disk without measuring.
    autotune.clear_memory_cache()
    log.clear()
    again = autotune.select("els", SHAPE, ("window", "row", "native"), "native", "static",
                           _probes(tuner, {"window": 1.0, "row": 2.0, "native": 3.0}, log))
    assert again.engine == "row" and "cached" in again.reason and log == []
    # Another shape class is measured again.
    other = autotune.select("els", dict(SHAPE, k=7), ("window", "row", "native"), "native",
                           "static", _probes(tuner, {"window": 1.0, "row": 2.0, "native": 3.0},
                                             log))
    assert other.engine == "window" and log


def test_measure_alternates_engines_and_stops_at_the_budget(tuner):
    log = []
    calls, _, _ = _probes(tuner, {"a": 0.01, "b": 0.014}, log)()
    times = autotune.measure(calls, rounds=5, budget=1.0)
    assert times == {"a": pytest.approx(0.01), "b": pytest.approx(0.014)}
    assert log == ["a", "b"] * 6                 # short calls: 1 untimed + 5 timed rounds
    log.clear()
    autotune.measure(calls, rounds=5, budget=0.0)
    assert log == ["a", "b"] * 3                 # budget spent: 1 untimed + 2 timed rounds
    # A clear lead (CLEAR_LEAD×) after two timed rounds ends it; just below it does not.
    assert autotune.CLEAR_LEAD == 1.5
    for b, rounds in ((0.016, 2), (0.014, 5)):
        log.clear()
        calls, _, _ = _probes(tuner, {"a": 0.01, "b": b, "c": 0.02}, log)()
        autotune.measure(calls, rounds=5, budget=1.0)
        assert log == ["a", "b", "c"] * (1 + rounds)
    # An engine more than ELIMINATE× slower than the fastest is timed once, then left out;
    # one just within it keeps being timed.
    log.clear()
    calls, _, _ = _probes(tuner, {"a": 0.01, "b": 0.012, "c": 0.026}, log)()
    times = autotune.measure(calls, rounds=5, budget=1.0)
    assert autotune.ELIMINATE == 2.5 and times["c"] == pytest.approx(0.026)
    assert log == ["a", "b", "c"] * 2 + ["a", "b"] * 4
    # Times are compared as scaled (an engine probed on twice the images, scaled by 1/2):
    # "c", 2.6× "a" per call, is 1.3× per unit of work, and keeps being timed.
    log.clear()
    times = autotune.measure(calls, rounds=5, budget=1.0, scale={"c": 0.5})
    assert times == {"a": pytest.approx(0.01), "b": pytest.approx(0.012),
                     "c": pytest.approx(0.013)}
    assert log == ["a", "b", "c"] * 6


def test_an_engine_far_behind_at_k_is_not_probed_at_k_plus_two(tuner):
    """At the neighbouring patch size of the same shape class, an engine that took over
    NEIGHBOUR× the fastest's time is left out (even where it would have won: the rule's
    bet), the two fastest are always probed, and a size without a measured neighbour
    probes everything."""
    assert autotune.NEIGHBOUR == 2.5
    engines_ = ("w", "x", "y", "z")
    log = []
    autotune.select("els", SHAPE, engines_, "w", "static",
                    _probes(tuner, {"w": 1.0, "x": 1.2, "y": 2.4, "z": 3.0}, log))
    assert set(log) == set(engines_)
    log.clear()
    nxt = autotune.select("els", dict(SHAPE, k=7), engines_, "w", "static",
                          _probes(tuner, {"w": 1.0, "x": 0.9, "y": 0.5, "z": 0.1}, log))
    assert set(log) == {"w", "x", "y"} and nxt.engine == "y"
    assert "not probed: z (over 2.5× the fastest at k = 5)" in nxt.reason
    log.clear()
    autotune.select("els", dict(SHAPE, k=11), engines_, "w", "static",
                    _probes(tuner, {"w": 1.0, "x": 0.9, "y": 0.5, "z": 0.1}, log))
    assert set(log) == set(engines_)
    # Another shape class (another N) learns nothing from these.
    log.clear()
    autotune.select("els", dict(SHAPE, k=7, N=4096), engines_, "w", "static",
                    _probes(tuner, {"w": 1.0, "x": 0.9, "y": 0.5, "z": 0.1}, log))
    assert set(log) == set(engines_)
    # The two fastest are probed (the second within NEIGHBOUR× of the first).
    log.clear()
    autotune.select("els", dict(SHAPE, k=3, N=64), ("a", "b", "c"), "a", "static",
                    _probes(tuner, {"a": 1.0, "b": 2.0, "c": 6.0}, log))
    log.clear()
    autotune.select("els", dict(SHAPE, k=5, N=64), ("a", "b", "c"), "a", "static",
                    _probes(tuner, {"a": 1.0, "b": 2.0, "c": 6.0}, log))
    assert set(log) == {"a", "b"}


def test_a_size_next_to_a_clear_winner_is_not_probed(tuner, tmp_path):
    """An engine that led every other by NEIGHBOUR× at k ± 2 (every engine timed there) wins
    at k without a probe; a smaller lead, an engine not timed there, another shape class or
    a neighbour that disagrees: probed. Only measurements go to disk; a new process decides
    the same from them."""
    eng = ("a", "b", "c")
    log = []
    autotune.select("local", SHAPE, eng, "a", "static",
                    _probes(tuner, {"a": 1.0, "b": 2.5, "c": 9.0}, log))
    log.clear()
    seven = autotune.select("local", dict(SHAPE, k=7), eng, "a", "static",
                            _probes(tuner, {"a": 9.0, "b": 1.0, "c": 1.0}, log))
    assert log == [] and seven.engine == "a" and seven.times is None
    assert "not probed: at k = 5 a led every other engine by ≥ 2.5×" in seven.reason
    on_disk = json.loads((tmp_path / "engines.json").read_text())
    assert [e["fields"]["k"] for e in on_disk.values()] == [5]
    autotune.clear_memory_cache()          # a new process: the k = 5 entry read from disk
    autotune.select("local", SHAPE, eng, "a", "static", _probes(tuner, {}, log))
    assert autotune.select("local", dict(SHAPE, k=3), eng, "a", "static",
                           _probes(tuner, {}, log)).reason == seven.reason
    assert log == []
    # Not two apart, another shape class, an engine the neighbour did not time: probed (c,
    # over NEIGHBOUR× behind at k = 5 and not among its two fastest, is left out there).
    for shape, engines_, want in ((dict(SHAPE, k=9), eng, "abc"),
                                  (dict(SHAPE, k=7, B=4), eng, "abc"),
                                  (dict(SHAPE, k=3, N=64), eng, "abc"),
                                  (dict(SHAPE, k=7), eng + ("d",), "abd")):
        log.clear()
        autotune.select("local", shape, engines_, "a", "static",
                        _probes(tuner, {e: 1.0 for e in engines_}, log))
        assert set(log) == set(want)
    # A lead just under NEIGHBOUR×: probed.
    log.clear()
    autotune.select("local", dict(SHAPE, N=8), eng, "a", "static",
                    _probes(tuner, {"a": 1.0, "b": 2.4, "c": 9.0}, log))
    log.clear()
    autotune.select("local", dict(SHAPE, N=8, k=7), eng, "a", "static",
                    _probes(tuner, {"a": 1.0, "b": 2.0, "c": 9.0}, log))
    assert set(log) == {"a", "b"}
    # Neighbours on both sides with different clear winners: probed.
    log.clear()
    autotune.select("local", dict(SHAPE, N=16, k=9), eng, "a", "static",
                    _probes(tuner, {"a": 9.0, "b": 1.0, "c": 9.0}, log))
    autotune.select("local", dict(SHAPE, N=16, k=5), eng, "a", "static",
                    _probes(tuner, {"a": 1.0, "b": 9.0, "c": 9.0}, log))
    log.clear()
    both = autotune.select("local", dict(SHAPE, N=16, k=7), eng, "a", "static",
                           _probes(tuner, {"a": 1.0, "b": 2.0, "c": 9.0}, log))
    assert set(log) == {"a", "b"} and both.reason.startswith("measured")


def _unit_probes(clock, seconds, log, units):
    """As ``_probes``, with the probe's units of work (its images) as a fourth element."""
    calls, note, scale = _probes(clock, seconds, log)()
    return lambda: (calls, note, scale, units)


def test_probe_order_visits_the_ends_then_the_middles():
    assert autotune.probe_order([3, 5, 7, 9, 11, 13, 15]) == [3, 15, 9, 5, 11, 7, 13]
    assert autotune.probe_order([7, 3, 3]) == [3, 7]
    assert autotune.probe_order([5]) == [5]
    order = autotune.probe_order([3, 5, 7, 9, 11, 13, 15, 17, 21, 23, 25, 27])
    assert sorted(order) == [3, 5, 7, 9, 11, 13, 15, 17, 21, 23, 25, 27] and order[:2] == [3, 27]


def test_a_size_between_two_measured_ones_is_interpolated_not_probed(tuner, tmp_path):
    """Per probe image, linear in k between the nearest measured sizes below and above (at
    most INTERPOLATE_SPAN apart, the merge fraction aside); a lead under
    INTERPOLATE_MARGIN×, a span too wide, an engine not timed at both ends or another shape
    class: probed. Interpolated choices are not written to disk; a new process that reads
    the two measurements interpolates again."""
    assert autotune.INTERPOLATE_SPAN == 6 and autotune.INTERPOLATE_MARGIN == 1.25
    log = []

    def at(k, times, units, prefer=None, **cls):
        """select at size k of the class ``cls``; the engines are ``times``' keys."""
        return autotune.select("els", dict(SHAPE, k=k, **cls), tuple(times), "a", "static",
                               _unit_probes(tuner, times, log, units), prefer=prefer)

    # k = 3 on 64 probe images, k = 9 on 128 (per image: a 1, 4 ms; b 3, 6 ms).
    at(3, {"a": 0.064, "b": 0.192}, 64, unique=0.5)
    at(9, {"a": 0.512, "b": 0.768}, 128, unique=1.0)
    log.clear()
    # k = 5: a 2 ms, b 4 ms per image (a leads 2×): not probed.
    five = at(5, {"a": 9.0, "b": 1.0}, 64, unique=0.8)
    assert log == [] and five.engine == "a" and five.times is None
    assert five.reason.startswith("interpolated between the probes at k = 3 and 9")
    assert "a 2e+03 µs, b 4e+03 µs" in five.reason
    # k = 7: a 3 ms, b 5 ms (1.67×): still a.
    assert at(7, {"a": 9.0, "b": 1.0}, 64).engine == "a" and log == []
    # A lead of 1.1× (N = 64 class): probed.
    at(3, {"a": 0.10, "b": 0.11}, 10, N=64)
    at(7, {"a": 0.10, "b": 0.12}, 10, N=64)
    log.clear()
    close = at(5, {"a": 1.0, "b": 0.5}, 10, N=64)
    assert log and close.engine == "b" and close.reason.startswith("measured")
    # ... unless the preferred engine is within the margin: it wins unprobed.
    at(3, {"a": 0.10, "b": 0.11}, 10, N=32)
    at(7, {"a": 0.10, "b": 0.12}, 10, N=32)
    log.clear()
    chose = at(5, {"a": 1.0, "b": 0.5}, 10, prefer="b", N=32)
    assert log == [] and chose.engine == "b" and "b preferred within 1.25×" in chose.reason
    # A span wider than INTERPOLATE_SPAN (3 … 11 at N = 2048): probed.
    at(3, {"a": 0.01, "b": 0.09}, 10, N=2048)
    at(11, {"a": 0.02, "b": 0.18}, 10, N=2048)
    log.clear()
    at(7, {"a": 1.0, "b": 2.0}, 10, N=2048)
    assert log
    # An engine timed at one end only (c, not at k = 9): out of the running where it was
    # over NEIGHBOUR× behind at the other end (5×), else the size is probed (c 1.5×).
    for c_time, probed in ((0.05, False), (0.015, True)):
        B = 4 if probed else 2
        at(5, {"a": 0.01, "b": 0.03, "c": c_time}, 10, B=B)
        at(9, {"a": 0.01, "b": 0.03}, 10, B=B)
        log.clear()
        got = at(7, {"a": 0.01, "b": 0.03, "c": 0.05}, 10, B=B)
        assert bool(log) == probed and got.engine == "a"
        assert got.reason.startswith("measured" if probed else "interpolated")
    # Probes without units (older callers): no interpolation.
    for k in (3, 7):
        autotune.select("els", dict(SHAPE, k=k, B=8), ("a", "b"), "a", "static",
                        _probes(tuner, {"a": 0.01, "b": 0.02}, log))
    log.clear()
    autotune.select("els", dict(SHAPE, k=5, B=8), ("a", "b"), "a", "static",
                    _probes(tuner, {"a": 0.01, "b": 0.02}, log))
    assert log
    # Only measurements reach the disk; a new process interpolates k = 5 again from them.
    disk = json.loads((tmp_path / "engines.json").read_text())
    assert not any(e["reason"].startswith("interpolated") for e in disk.values())
    autotune.clear_memory_cache()
    log.clear()
    at(3, {"a": 1.0, "b": 1.0}, 1, unique=0.5)            # read from disk, not measured
    at(9, {"a": 1.0, "b": 1.0}, 1, unique=1.0)
    again = at(5, {"a": 9.0, "b": 1.0}, 64, unique=0.8)
    assert log == [] and again.engine == "a" and again.reason == five.reason


def test_a_preferred_engine_wins_a_near_tie_of_the_probes(tuner):
    log = []
    eng = ("window", "shiftmap")
    near = autotune.select("els", SHAPE, eng, "window", "static",
                           _probes(tuner, {"window": 1.0, "shiftmap": 1.08}, log),
                           prefer="shiftmap")
    assert near.engine == "shiftmap" and "shiftmap preferred within 1.1×" in near.reason
    far = autotune.select("els", dict(SHAPE, k=7), eng, "window", "static",
                          _probes(tuner, {"window": 1.0, "shiftmap": 1.15}, log),
                          prefer="shiftmap")
    assert far.engine == "window" and "preferred" not in far.reason


def test_a_machine_probes_the_ends_of_its_sizes_and_interpolates_between(tuner, monkeypatch):
    """make_machine chooses its sizes' engines in probe order: 3 and 7 are probed, 5 (a
    clear lead at both) is interpolated; the machine still computes the oracle's x̂_0."""
    measured = []

    def fake(calls, **kw):                        # one engine clearly ahead at every k
        measured.append(sorted(calls))
        times = {"window_native": 0.001, "window": 0.004, "row": 0.005, "native": 0.003,
                 "shiftmap": 0.01}
        return {name: times[name] for name in calls}
    monkeypatch.setattr(autotune, "measure", fake)

    def probe_calls(k, c, h, w, boundary, wrap_patches, n, batch, eng, *args, **kw):
        return {e: None for e in eng}, "fake probe", None, 64    # no probe banks built
    monkeypatch.setattr(engines, "_els_probe_calls", probe_calls)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (6, 16, 16, 1)).astype(np.float32)
    m = ej.make_machine("els", images, scales=[3, 5, 7], boundary="zeros", dedup=False)
    assert len(measured) == 2 and measured[0] == measured[1]
    info = m.explain()
    assert info[5]["reason"].startswith("interpolated between the probes at k = 3 and 7")
    assert "measured" in info[3]["reason"] and "measured" in info[7]["reason"]
    x = jnp.asarray(0.7 * images[:2] + 0.7 * rng.normal(size=(2, 16, 16, 1)), jnp.float32)
    want = oracles.els_x0(x, 0.4, images, 5, "zeros", False)
    np.testing.assert_allclose(np.asarray(m.x0(x, jnp.float32(0.4), 1)), want, atol=3e-4)


def test_static_rule_single_engine_and_failing_probes(tuner, monkeypatch):
    log = []
    probes = _probes(tuner, {"window": 1.0, "row": 2.0}, log)
    only = autotune.select("els", SHAPE, ("window",), "window", "static", probes)
    assert only.engine == "window" and "only" in only.reason
    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "0")
    off = autotune.select("els", SHAPE, ("window", "row"), "row", "static rule: x", probes)
    assert off == autotune.Choice("row", "static rule: x; ELS_JAX_AUTOTUNE=0") and log == []
    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "1")

    def broken():
        raise RuntimeError("no such engine here")
    calls = {"window": lambda: None, "row": broken}
    with pytest.warns(RuntimeWarning, match="'row' failed"):
        choice = autotune.select("els", dict(SHAPE, k=9), ("window", "row"), "row", "static",
                                lambda: (calls, "fake", None))
    assert choice.engine == "window"
    with pytest.raises(ValueError, match="not among"):
        autotune.select("els", SHAPE, ("window", "row"), "native", "static", probes)


def test_window_probe_time_scales_with_the_merged_fraction(tuner, monkeypatch):
    """A bank with merged windows holds that fraction of the candidates: the window engine's
    probe time is scaled by it (the probe's synthetic images have no duplicates)."""
    monkeypatch.setattr(autotune, "measure", _fixed_times({"window": 4.0, "row": 1.0}, []))
    kw = dict(k=5, c=1, h=8, w=8, boundary="circular", n=64, banked=True)
    assert engines.els_engine(("window", "row"), "window", "s", **kw).engine == "row"
    merged = engines.els_engine(("window", "row"), "window", "s", unique_fraction=0.2, **kw)
    assert merged.engine == "window" and merged.times["window"] == pytest.approx(0.8)
    # Unknown N or a sharded machine: the static rule, nothing measured.
    assert "static" in engines.els_engine(("window", "row"), "row", "static rule",
                                          **dict(kw, n=None)).reason
    assert engines.els_engine(("window", "row"), "row", "static rule", sharded=True,
                              **kw).engine == "row"


@pytest.mark.parametrize("batch,cores,want", [(1, 2, 256), (2, 2, 128), (4, 2, 64),
                                               (1, 4, 512), (1, 2, 100)])
def test_a_shift_map_probe_gives_every_core_two_kernel_blocks(monkeypatch, batch, cores, want):
    """The shift-map kernel splits its work into (query image, block of images) items (here
    blocks of 64, as built for AVX2): its
    probe holds 2·cores blocks over the batch (at most the N there is), or it would time the
    kernel on fewer cores than the XLA engines use. The other engines keep 32 images per core
    (cores = 2, N = 100: 64) and the shift map's time is scaled to their N (every engine's cost
    is linear in N): on a probe of the same images, the scaled time is what the shift map takes
    on the others' N."""
    monkeypatch.setattr(engines, "cpu_info", lambda: {"cores": cores})
    monkeypatch.setattr(native, "shift_block", lambda: 64)
    n = 100 if want == 100 else 4096
    base = min(n, 32 * cores)
    probe = dict(k=3, c=1, h=32, w=32, boundary="zeros", wrap_patches=False, n=n, batch=batch,
                 banked=False, block=1 << 16)
    calls, note, scale, units = engines._els_probe_calls(engines=("window", "shiftmap"),
                                                         **probe)
    assert note.startswith(f"{base} synthetic images") and units == base
    if want == base:
        assert scale is None and "shiftmap on" not in note
    else:
        assert scale == {"shiftmap": base / want}
        assert f"shiftmap on {want}, its time scaled by {base}/{want}" in note
    _, note, scale, _ = engines._els_probe_calls(engines=("window", "row"), **probe)
    assert note.startswith(f"{base} synthetic images") and scale is None


def test_the_shift_map_probe_scale_enters_the_choice(tuner, monkeypatch):
    """The shift map, 3× the window engine's time on its 4× larger probe, is 0.75× of it per
    image: it wins, and the reason and times say so; and the unique-fraction scale of a merged
    window bank applies with it."""
    monkeypatch.setattr(engines, "cpu_info", lambda: {"cores": 2})
    monkeypatch.setattr(native, "shift_block", lambda: 64)
    ran = []
    monkeypatch.setattr(autotune, "measure",
                        _fixed_times({"window": 0.010, "window_native": 0.009,
                                      "shiftmap": 0.030}, ran))
    kw = dict(k=3, c=1, h=32, w=32, boundary="zeros", n=4096, batch=1, block=1 << 16)
    choice = engines.els_engine(("window", "shiftmap"), "window", "static rule",
                                banked=False, **kw)
    assert choice.engine == "shiftmap" and choice.times == {"window": 0.01, "shiftmap": 0.0075}
    assert "shiftmap on 256, its time scaled by 64/256" in choice.reason
    if not native.available():
        return
    autotune.clear_memory_cache()
    choice = engines.els_engine(("window_native", "shiftmap"), "window_native", "static rule",
                                banked=True, unique_fraction=0.5, **kw)
    assert choice.engine == "window_native"
    assert choice.times == {"window_native": 0.0045, "shiftmap": 0.0075}


def _fixed_times(times, ran):
    """A stand-in for ``engines.measure`` that runs every probe once (so the real probes are
    exercised) and reports fixed times (scaled as ``measure`` scales them)."""
    def fake(calls, scale=None, **kw):
        for name, call in calls.items():
            call()
            ran.append(name)
        return {name: times[name] * (scale or {}).get(name, 1.0) for name in calls}
    return fake


@pytest.mark.parametrize("winner", ["native", "window_native", "shiftmap"]
                         if native.available() else ["window", "row", "shiftmap"])
def test_machine_runs_the_measured_engine_and_explains_it(tuner, monkeypatch, winner):
    """The real probes run (every applicable engine on synthetic images); whichever engine
    wins, the machine computes the oracle's x̂_0 and explain() says what decided. (Two
    winners: every probe runs for each, and each engine meets the oracle elsewhere.)"""
    # (a 2× lead: both sizes are probed; from NEIGHBOUR× on, the second would not be)
    times = {"window": 2.0, "row": 2.0, "native": 2.0, "window_native": 2.0, "shiftmap": 2.0,
             winner: 1.0}
    ran = []
    monkeypatch.setattr(autotune, "measure", _fixed_times(times, ran))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 9, 8, 1)).astype(np.float32)
    x = jnp.asarray(0.8 * images[:2] + 0.6 * rng.normal(size=(2, 9, 8, 1)), jnp.float32)
    m = ej.make_machine("els", images, scales=[3, 5], boundary="zeros", dedup=False)
    # Where the CPU kernels run, neither the row engine nor the XLA window engine (its bank
    # is run by the window kernel) is probed: neither came near the winner there.
    want_engines = ({"native", "window_native", "shiftmap"} if native.available()
                    else {"window", "row", "shiftmap"})
    assert set(ran) == want_engines                      # both sizes: same applicable set
    info = m.explain()
    assert set(info) == {3, 5}
    for k in (3, 5):
        assert info[k]["engine"] == winner == m.engine(0 if k == 5 else 1)["engine"]
        assert "measured" in info[k]["reason"] and info[k]["times"][winner] == 1.0
    for i, k in ((0, 5), (1, 3)):
        want = oracles.els_x0(x, 0.3, images, k, "zeros", False)
        np.testing.assert_allclose(np.asarray(m.x0(x, jnp.float32(0.3), i)), want, atol=3e-4)
    # The same machine again: chosen from the cache, nothing probed.
    autotune.clear_memory_cache()
    ran.clear()
    again = ej.make_machine("els", images, scales=[3, 5], boundary="zeros", dedup=False)
    assert ran == [] and "cached" in again.explain()[3]["reason"]


@pytest.mark.skipif(not native.available(), reason="no C++ compiler here")
@pytest.mark.parametrize("winner", ["kernel", "xla"])
def test_local_machine_engine_follows_the_measurement(tuner, monkeypatch, winner):
    ran = []
    monkeypatch.setattr(autotune, "measure",
                        _fixed_times({"kernel": 2.0, "xla": 2.0, winner: 1.0}, ran))
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (40, 6, 7, 2)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(3, 6, 7, 2)), jnp.float32)
    m = ej.make_machine("local", images, scales=3, compile_for=x)
    assert sorted(ran) == ["kernel", "xla"]
    assert m.explain()[3]["engine"] == winner
    hlo = m.lower(x, jnp.float32(0.5), 0).as_text()
    assert ("els_local_softmax" in hlo) == (winner == "kernel")
    want = oracles.local_x0(np.asarray(x, np.float64), 0.5, images.astype(np.float64), 3)
    np.testing.assert_allclose(np.asarray(m.x0(x, jnp.float32(0.5), 0)), want, atol=2e-5)
    # Explicit engines win over the measurement.
    forced = ej.make_machine("local", images, scales=3, method="xla")
    assert forced.explain()[3]["engine"] == "xla"
    assert "explicit" in forced.explain()[3]["reason"]
    with pytest.raises(ValueError, match="unknown LS engine"):
        engines.resolve_local_engine("row", k=3, c=1, h=6, w=7, n=40)


def test_static_rules_without_autotuning(monkeypatch):
    """ELS_JAX_AUTOTUNE=0 (the test suite's default): today's static rules, no probe."""
    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "0")
    autotune.clear_memory_cache()
    monkeypatch.setattr(autotune, "measure", lambda *a, **kw: pytest.fail("measured"))
    images = np.random.default_rng(2).uniform(-1, 1, (10, 16, 16, 1)).astype(np.float32)
    info = ej.make_machine("els", images, scales=[3, 11], boundary="circular").explain()
    # (the cost model's window engine is run by the fused kernel where it is built)
    assert info[3]["engine"] == ("window_native" if native.available() else "window")
    # (k ≥ 7 on a CPU with the kernels: the shift-map kernel, no bank; else the cost model)
    assert info[11]["engine"] == ("shiftmap" if native.available() else "row")
    assert info[11]["bank"] is (not native.available())
    assert all("static rule" in v["reason"] for v in info.values())
    zeros = ej.make_machine("els", images, scales=5, boundary="zeros").explain()[5]
    assert zeros["engine"] == ("native" if native.available()
                               else engines.choose_method(5, 1, 16, "zeros"))
    ideal = ej.make_machine("ideal", images).explain()[None]
    assert ideal["engine"] == "stream" and "no bank" in ideal["reason"]
    # A streamed pass (no bank fits): the shift-map kernel where the CPU kernels run, for
    # every k and boundary, and the only engine probed there; without them, the cost model's
    # XLA engine.
    for k, boundary in ((3, "circular"), (11, "circular"), (5, "zeros"), (27, "zeros")):
        got = engines.resolve_els_engine("auto", k, 3, 32, boundary, banked=False, n=50000)
        assert got.engine == ("shiftmap" if native.available()
                              else engines.choose_method(k, 3, 32, boundary)), (k, boundary)
    streamed = ej.make_machine("els", images, scales=[3, 11], boundary="zeros",
                               bank_bytes=0).explain()
    for v in streamed.values():
        assert v["bank"] is False
        if native.available():
            assert v["engine"] == "shiftmap", v
        else:
            assert "static rule" in v["reason"]
    x = jnp.zeros((1, 16, 16, 1))
    assert ej.els_x0(x, 0.5, images, k=3).shape == x.shape


def test_platform_signature_names_the_cpu_and_its_simd():
    sig = autotune.platform_signature()
    assert sig["backend"] == "cpu" and sig["jax"] and sig["kernel"]
    assert isinstance(sig["simd"], list) and sig["cores"] >= 1
    assert schedules.Cosine()            # (the probes' schedule)


def test_a_machine_probes_its_own_images(tuner, monkeypatch):
    """A machine's probes run on its own training images, spread over the set (synthetic
    ones only when it has too few, or in the functional path), and their decision is cached
    apart from synthetic probes'."""
    rng = np.random.default_rng(7)     # (seed 0 would draw the synthetic images themselves)
    data = rng.uniform(-1, 1, (40, 8, 8, 1)).astype(np.float32)
    got, *_ = engines._probe_inputs(16, 1, 8, 8, 1, data)
    rows = [int(np.flatnonzero((data == g).all(axis=(1, 2, 3)))[0]) for g in got]
    assert rows[0] == 0 and rows[-1] == 39 and np.all(np.diff(rows) >= 2)   # not data[:16]
    synth, *_ = engines._probe_inputs(64, 1, 8, 8, 1, data)      # 40 < 64: synthetic
    assert synth.shape == (64, 8, 8, 1) and not np.array_equal(synth[:40], data)
    ran = []
    monkeypatch.setattr(autotune, "measure",
                        _fixed_times({"window": 2.0, "row": 2.0, "native": 2.0,
                                      "window_native": 1.0, "shiftmap": 2.0}, ran))
    m = ej.make_machine("els", data, scales=3, boundary="zeros", dedup=False)
    assert "40 training images" in m.explain()[3]["reason"]
    kw = dict(k=3, c=1, h=8, w=8, boundary="zeros", n=40, batch=1, block=1 << 16)
    own = engines.els_engine(("window", "shiftmap"), "window", "rule", probe_images=data, **kw)
    synthetic = engines.els_engine(("window", "shiftmap"), "window", "rule", **kw)
    assert "training images" in own.reason and "synthetic images" in synthetic.reason
    assert "cached" not in synthetic.reason           # not the other probe's decision


def test_probes_and_the_merge_estimate_see_a_sorted_set_whole():
    """A set sorted by class (mnist5k is) has its classes at the ends: the unique-window
    estimate and the probes take images spread over the whole set, not its first ones. Half
    random images (no window repeats) then half blank ones (every window the same): about
    half the windows are left after merging, where the first images alone said none merge."""
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.uniform(-1, 1, (200, 8, 8, 1)),
                           -np.ones((200, 8, 8, 1))]).astype(np.float32)
    u = els_window.estimate_unique_fraction(data, k=3, boundary="zeros", sample=64, first=16)
    assert 0.45 < u < 0.55
    whole = els_window.estimate_unique_fraction(data, k=3, boundary="zeros", sample=400)
    assert abs(u - whole) < 0.05
    assert els_window.estimate_unique_fraction(data[:200], k=3, boundary="zeros") > 0.97
    got, *_ = engines._probe_inputs(32, 1, 8, 8, 1, data)
    blank = (got == -1).all(axis=(1, 2, 3))
    assert blank.sum() == 16 and not blank[:16].any()
    np.testing.assert_array_equal(els_window.spread_sample(data, 500), data)


def test_merge_estimates_are_remembered_on_disk_for_the_same_images(tmp_path, monkeypatch):
    """``estimate_unique_fraction`` is computed once per data and parameters and read back
    from ``$ELS_JAX_CACHE/estimates.json`` (a warm run skips it), keyed by the images it
    reads: other images or another k are computed afresh; with ELS_JAX_AUTOTUNE=0 nothing
    is written."""
    monkeypatch.setenv("ELS_JAX_CACHE", str(tmp_path))
    rng = np.random.default_rng(4)
    data = np.concatenate([rng.uniform(-1, 1, (40, 8, 8, 1)),
                           -np.ones((40, 8, 8, 1))]).astype(np.float32)
    calls = []
    real = els_window.count_unique_rows
    monkeypatch.setattr(els_window, "count_unique_rows",
                        lambda rows: calls.append(1) or real(rows))
    kw = dict(k=3, boundary="zeros", sample=64, first=16)

    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "0")
    off = els_window.estimate_unique_fraction(data, **kw)
    assert calls and not (tmp_path / "estimates.json").exists()

    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "1")
    autotune.clear_memory_cache()
    try:
        first = els_window.estimate_unique_fraction(data, **kw)
        n_calls = len(calls)
        autotune.clear_memory_cache()             # a new process: only the disk remembers
        again = els_window.estimate_unique_fraction(data, **kw)
        assert again == first == off and len(calls) == n_calls
        assert (tmp_path / "estimates.json").exists()
        other = data.copy()
        other[40:] = rng.uniform(-1, 1, (40, 8, 8, 1))     # nothing merges any more
        assert els_window.estimate_unique_fraction(other, **kw) > 0.97
        assert len(calls) > n_calls
        n_calls = len(calls)
        els_window.estimate_unique_fraction(data, **{**kw, "k": 5})
        assert len(calls) > n_calls
    finally:
        autotune.clear_memory_cache()


def test_a_window_bank_reads_its_merged_rows_back_exactly(tmp_path, monkeypatch):
    """A deduplicated window bank's grouping (which rows are distinct, how often each occurs)
    is kept in ``$ELS_JAX_CACHE/estimates`` and read back by the next build from the same
    images: the bank is the same bit for bit, without sorting again; other images are
    grouped afresh, and a damaged file is recomputed, not trusted."""
    from els_jax.engines import layout as geo
    monkeypatch.setenv("ELS_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("ELS_JAX_AUTOTUNE", "1")
    rng = np.random.default_rng(6)
    images = np.concatenate([rng.uniform(-1, 1, (6, 8, 8, 1)),
                             -np.ones((6, 8, 8, 1))]).astype(np.float32)
    gp = geo.grouped_passes(3, "zeros", False, 8, 8, False, "window")[0]
    sorts = []
    real = els_window.unique_row_index
    monkeypatch.setattr(els_window, "unique_row_index",
                        lambda rows: sorts.append(1) or real(rows))

    def bank(imgs):
        b, _ = els_window.build_window_bank(imgs, 3, gp, imgs.mean(axis=(0, 1, 2)),
                                            dedup=True, block=1 << 16)
        return np.asarray(b.keys), np.asarray(b.values)

    first = bank(images)
    assert len(sorts) == 1 and len(list((tmp_path / "estimates").glob("*.npz"))) == 1
    again = bank(images)
    assert len(sorts) == 1                                 # read back, not sorted again
    for u, v in zip(first, again):
        np.testing.assert_array_equal(u, v)
    # the merged bank: blank windows collapse to few rows, log counts sum to every window
    keys = first[0][0]
    live = np.isfinite(keys[:, -1])
    windows = 12 * gp.cand_pixels.shape[1]
    assert live.sum() == 6 * gp.cand_pixels.shape[1] + 1        # random ones, one blank
    assert np.isclose(np.exp(keys[live, -1]).sum(), windows)

    other = images.copy()
    other[6:] = rng.uniform(-1, 1, (6, 8, 8, 1))
    bank(other)
    assert len(sorts) == 2                                 # other images: their own grouping

    for f in (tmp_path / "estimates").glob("*.npz"):
        f.write_bytes(b"not an npz")
    damaged = bank(images)
    assert len(sorts) == 3
    np.testing.assert_array_equal(damaged[0], first[0])
