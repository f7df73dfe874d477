"""The layer rule, read from the code: a module imports only its own layer and the layers below.

spec -> hosts -> net -> wire/model -> apps -> experiments -> report -> cli.  Lazy imports
inside functions count as well: a layer that needs a higher one at run time is still upside down.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "testbed"

# Lower number = lower layer.  ``testbed`` itself, ``testbed.omp`` and ``testbed.files`` are base utilities.
RANK = {
    "testbed": 0, "omp": 0, "files": 0, "spec": 1, "hosts": 2, "net": 3, "wire": 4, "model": 4,
    "apps": 5, "experiments": 6, "report": 7, "cli": 8, "demo": 8, "__main__": 8,
}
# Modules of testbed/apps/ that every application shares: the node-program launcher, the placement grammar.
SHARED = {"launch", "placement"}
# The message format and the model know nothing of the emulated network or its hosts.
APART = {("wire", "net"), ("wire", "hosts"), ("model", "net"), ("model", "hosts")}


def layer(module: str) -> str:
    """``testbed.net.shaping.kernel`` -> ``net``; ``testbed`` -> ``testbed``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "testbed"


def app_of(module: str) -> str | None:
    """``testbed.apps.inference.run`` -> ``inference``; ``testbed.apps.launch`` -> ``launch``."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "apps" else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every ``testbed`` import in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "testbed"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "testbed":
                # ``from testbed import omp`` names a module: judge the module, not the package
                found += [(node.lineno, f"{node.module}.{a.name}") if node.module == "testbed"
                          else (node.lineno, node.module) for a in node.names]
    return found


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def violations(path: Path, root: Path = ROOT) -> list[str]:
    me = module_name(path, root)
    where = path.relative_to(root)
    out = []
    for line, target in imports(path):
        mine, theirs = layer(me), layer(target)
        if theirs not in RANK:
            out.append(f"{where}:{line}: imports {target}: unknown layer {theirs!r}")
            continue
        if RANK[theirs] > RANK[mine]:
            out.append(f"{where}:{line}: {me} ({mine}) imports {target} ({theirs}), a higher layer")
        if (mine, theirs) in APART:
            out.append(f"{where}:{line}: {me} ({mine}) imports {target}: {mine} stays apart from {theirs}")
        a, b = app_of(me), app_of(target)
        if a and b and a != b and not {a, b} & SHARED:
            out.append(f"{where}:{line}: application {a} imports application {b}")
        if a in SHARED and b and b not in SHARED:
            out.append(f"{where}:{line}: {a} (shared by the applications) imports application {b}")
    return out


def test_every_module_is_in_a_known_layer() -> None:
    unknown = sorted({layer(module_name(p)) for p in PKG.rglob("*.py")} - set(RANK))
    assert not unknown, f"modules outside every layer: {unknown} (add them to RANK in {__file__})"


def test_no_module_imports_a_higher_layer() -> None:
    bad = [v for p in sorted(PKG.rglob("*.py")) for v in violations(p)]
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_node_programs_stay_below_experiments() -> None:
    bad = [f"{p.name}:{line}: {t}" for p in sorted((ROOT / "nodes").glob("*.py"))
           for line, t in imports(p) if RANK.get(layer(t), 99) > RANK["apps"]]
    assert not bad, "node programs import above the application layer:\n" + "\n".join(bad)


@pytest.mark.parametrize(("src", "target", "ok"), [
    ("net.network", "hosts.factory", True),
    ("hosts.factory", "net.network", False),
    ("model.shard", "net.network", False),
    ("wire.message", "hosts.limits", False),
    ("spec.suite", "hosts.limits", False),
    ("wire.message", "model.codecs", True),
    ("apps.training.stage", "apps.launch", True),
    ("apps.training.stage", "apps.inference.placement", False),
    ("apps.training.placement", "apps.placement", True),
    ("apps.placement", "apps.inference.run", False),
    ("experiments.runner", "apps.inference.sessions", True),
    ("net.clean", "apps.inference.run", False),
])
def test_the_rule_itself(tmp_path: Path, src: str, target: str, ok: bool) -> None:
    """The checker flags what it should (a file placed under a fake testbed/ tree)."""
    fake = tmp_path / "testbed" / Path(*src.split(".")).with_suffix(".py")
    fake.parent.mkdir(parents=True)
    fake.write_text(f"from testbed.{target} import x\n")
    assert (violations(fake, tmp_path) == []) is ok
