"""The package's architecture, checked from its source (no import is executed):

- imports go only downward: experiment → machines | nets → engines → core (cli on top, the
  package's ``__init__`` above everything); machines and nets sit side by side and do not
  import each other;
- no import cycle between modules (inside a layer either);
- time enters once: no function in ``engines/`` (nor ``core/softmax.py``) takes a time ``t``
  or a ``schedule`` — machines turn t into the coefficients a, b² and pass those down;
- following ``t`` from ``ej.els_score``: the modules that read it are few (docs: ≤ 4).
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "els_jax"

# Rank of each layer; an import must go to a strictly lower rank, or stay in its own folder.
RANK = {"core": 0, "engines": 1, "machines": 2, "nets": 2, "experiment": 3, "cli": 4,
        "__init__": 5}


def _modules():
    """{dotted module name: path} of every module of the package."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The package modules ``module`` imports (module-level and inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                   # relative import
                anchor = module.split(".")[: len(module.split(".")) - node.level
                                           + (path.name == "__init__.py")]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # the longest prefix that is one of our modules
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in MODULES and cand != module:
                    found.add(cand)
                    break
    # "from els_jax.x import y" also names the package els_jax.x: keep only the deepest
    return {m for m in found if m != "els_jax" and not any(
        o.startswith(m + ".") for o in found)}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    for m in MODULES:
        assert _layer(m) in RANK, f"{m} is in no layer of {sorted(RANK)}"


def climbs(graph) -> list[str]:
    """Imports of a module from a layer of equal or higher rank in another folder."""
    bad = []
    for m, deps in graph.items():
        lm = _layer(m)
        for d in deps:
            ld = _layer(d)
            if ld != lm and RANK[ld] >= RANK[lm]:
                bad.append(f"{m} ({lm}) imports {d} ({ld})")
    return sorted(bad)


def cycles(graph) -> list[list[str]]:
    """Every back edge of a depth-first search, as the cycle it closes."""
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_imports_only_go_downward():
    bad = climbs(GRAPH)
    assert not bad, "imports that climb or cross:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" → ".join(c) for c in found)


def test_the_checks_can_fail():
    """An engine importing a machine is a climb, machines and nets importing each other cross,
    and modules importing each other in a ring are a cycle."""
    assert climbs({"els_jax.engines.window": {"els_jax.machines.els"}}) == [
        "els_jax.engines.window (engines) imports els_jax.machines.els (machines)"]
    assert climbs({"els_jax.nets.train": {"els_jax.machines.factory"}})
    assert climbs({"els_jax.core.sampler": {"els_jax.engines.layout"}})
    assert not climbs({"els_jax.machines.els": {"els_jax.engines.passes",
                                                "els_jax.machines.local"}})
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # and the real graph is read: machines.els imports engines and core
    assert {"els_jax.engines.passes", "els_jax.core.schedules"} <= GRAPH["els_jax.machines.els"]


def _function_args(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs:
                yield getattr(node, "name", "<lambda>"), arg.arg


@pytest.mark.parametrize("path", sorted(str(p) for p in (PKG / "engines").glob("*.py"))
                         + [str(PKG / "core" / "softmax.py")])
def test_engines_never_take_a_time_or_a_schedule(path):
    bad = [f"{fn}({arg})" for fn, arg in _function_args(pathlib.Path(path))
           if arg in ("t", "schedule")]
    assert not bad, f"{path}: takes a time or a schedule: {bad}"


def test_time_from_els_score_reaches_few_modules():
    """The modules whose functions take a time ``t`` on the way from ``ej.els_score`` down:
    the machine itself and the schedule that turns t into a, b² (conversions take the
    coefficients). Reading the call chain statically: every module els.py imports that has a
    function with a parameter ``t``, and is called with t from els.py."""
    els = (PKG / "machines" / "els.py").read_text()
    tree = ast.parse(els)
    calls_with_t = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            uses_t = any(isinstance(a, ast.Name) and a.id == "t" for a in node.args) or any(
                isinstance(k.value, ast.Name) and k.value.id == "t" for k in node.keywords)
            if uses_t and isinstance(node.func, ast.Attribute) and isinstance(
                    node.func.value, ast.Name):
                calls_with_t.add(node.func.value.id)
            elif uses_t and isinstance(node.func, ast.Name):
                calls_with_t.add(node.func.id)
    # t goes to schedules_lib.query_coefficients and to els_x0 (this module) only: the
    # modules it reaches are machines/els.py and core/schedules.py.
    assert calls_with_t <= {"schedules_lib", "els_x0"}, calls_with_t
    assert "schedules_lib" in calls_with_t          # and the call chain was read at all


def test_every_ej_name_in_the_readme_and_docs_exists():
    """``import els_jax as ej`` keeps every name the README and docs/ (theory, benchmarks)
    use."""
    import re

    import els_jax as ej
    root = PKG.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    text = "".join(page.read_text() for page in pages)
    names = set(re.findall(r"\bej\.([A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*)", text))
    assert len(names) > 20
    missing = []
    for dotted in sorted(names):
        obj = ej
        for part in dotted.split("."):
            if not hasattr(obj, part):
                missing.append(dotted)
                break
            obj = getattr(obj, part)
    assert not missing, missing
