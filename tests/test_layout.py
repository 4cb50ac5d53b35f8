"""The repository's shape: no import cycles in either package, and a wheel that works on its own.

The wheel test builds the wheel, installs it into a fresh virtual environment with no checkout
around (the dependencies come from this environment's site-packages by a .pth line, which does not
run this environment's editable-install hook), and runs the commands that need the packaged data:
`kvpilot crds --check`, `kvpilot observability --check`, `kvpilot render` with a preset.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvpilot_engine": ROOT / "engine", "kvpilot_operator": ROOT / "operator"}


def modules(package: str) -> dict[str, Path]:
    base = PACKAGES[package]
    out = {}
    for path in sorted((base / package).rglob("*.py")):
        parts = path.relative_to(base).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The kvpilot modules `module` imports, at any depth (a lazy import inside a function still
    makes a cycle), except under `if TYPE_CHECKING:`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package: str) -> None:
    found = modules(package)
    known = set(found)
    graph = {m: imports(m, p, known) for m, p in found.items()}
    assert cycles(graph) == []


def test_every_subpackage_is_in_the_wheel() -> None:
    """pyproject lists the packages the wheel carries: a new subpackage missing there works in an
    editable install and is absent from the wheel (and the images)."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(base).parts)
        for package, base in PACKAGES.items()
        for init in (base / package).rglob("__init__.py")
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_module_names_resolve() -> None:
    """The graph above sees the imports it should (a guard against a finder that sees nothing)."""
    found = modules("kvpilot_operator")
    known = set(found)
    reconcile = imports(
        "kvpilot_operator.controller.reconcile",
        found["kvpilot_operator.controller.reconcile"],
        known,
    )
    assert {"kvpilot_operator.api.policies", "kvpilot_operator.rollout.plan"} <= reconcile


@pytest.mark.slow
def test_an_installed_wheel_works_without_a_checkout(tmp_path: Path) -> None:
    # Built from a copy of the files git knows (as a clone has them, symlinks included): an
    # in-tree build/ could carry modules that no longer exist into the wheel.
    src = tmp_path / "src"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        if (ROOT / rel).is_symlink() or (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel, follow_symlinks=False)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(src)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = wheels.glob("kvpilot-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # This environment's dependencies, but not its editable kvpilot (a .pth line adds a path; the
    # editable hook is itself a .pth file in that folder, which Python does not process).
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", str(wheel)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [str(venv / "bin" / args[0]), *args[1:]],
            cwd=work, input=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    where = run(
        "python",
        "-c",
        "import kvpilot_engine, kvpilot_operator.packaged as p\n"
        "import kvpilot_operator.api.policies as q\n"
        "print(p.__file__, kvpilot_engine.__file__, p.source_tree(), sorted(q.load_presets()))\n"
        "assert (p.packaged('examples') / 'quickstart.yaml').is_file()\n"
        "assert (p.packaged('dashboards') / 'kvpilot-llmservice.json').is_file()",
    )
    assert str(ROOT) not in where and str(site) in where, where
    assert "None ['copilot', 'interactive-chat', 'offline-batch']" in where
    run("kvpilot", "crds", "--check")
    run("kvpilot", "observability", "--check")
    service = (ROOT / "docs" / "examples" / "smollm2-chat.yaml").read_text()
    docs = list(yaml.safe_load_all(run("kvpilot", "render", "-f", "-", stdin=service)))
    (engine,) = [d for d in docs if d["metadata"]["name"] == "smollm2-chat-engine"
                 and d["kind"] == "Deployment"]  # fmt: skip
    args = engine["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-num-seqs") + 1] == "128"  # from the packaged preset


@pytest.mark.slow
def test_the_command_line_loads_no_torch() -> None:
    """The operator image has no torch, and runs `kvpilot operator`, `router`, `render`, `crds`:
    building the `kvpilot` parser (every subcommand's flags) must not import it."""
    code = "import sys, kvpilot_engine.cli as c\nc.build_parser()\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
