"""The package declares what it imports: every third-party module pgrpo imports is a runtime dependency (or, for
the optional features, an extra) of pyproject.toml; test tools are not runtime dependencies; the lock pins them all.
(A fresh venv + `pip install -e . --no-build-isolation` running `pgrpo train` was checked by hand: docs/training.md.)"""
import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORT_TO_DIST = {"yaml": "pyyaml", "prometheus_client": "prometheus-client"}
OPTIONAL = {"matplotlib": "report"}   # imported only by `pgrpo report`'s plots


def _name(req):
    return re.split(r"[<>=!~\[; ]", req, 1)[0].lower()


def _imports():
    mods = set()
    for path in (REPO / "pgrpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in ("pgrpo", "__future__")}


def test_every_third_party_import_is_declared():
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = {_name(r) for r in proj["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in proj["optional-dependencies"].items()}
    for mod in sorted(_imports()):
        dist = IMPORT_TO_DIST.get(mod, mod).lower()
        if mod in OPTIONAL:
            assert dist in extras[OPTIONAL[mod]], mod
        else:
            assert dist in deps, f"pgrpo imports {mod} but pyproject.toml does not depend on {dist}"
    # torch.utils.tensorboard needs the tensorboard package: the `tensorboard` extra
    assert "tensorboard" in extras["tensorboard"]
    # test tools are never runtime dependencies
    assert not deps & {"pytest", "docker-compose", "prometheus"}
    assert "pytest" in extras["test"]


def test_lock_pins_every_dependency_and_build_needs_torch():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(_name(r) == "torch" for r in py["build-system"]["requires"])
    pinned = {_name(line) for line in (REPO / "requirements-lock.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    lock = (REPO / "requirements-lock.txt").read_text()
    assert all("==" in line for line in lock.splitlines() if line and not line.startswith("#"))
    wanted = {_name(r) for r in py["project"]["dependencies"]}
    for extra in ("test", "report", "tensorboard"):
        wanted |= {_name(r) for r in py["project"]["optional-dependencies"][extra]}
    assert wanted <= {p.replace("_", "-") for p in pinned} | pinned, wanted - pinned
    assert not any(p in pinned for p in ("projected-grpo", "pgrpo"))
