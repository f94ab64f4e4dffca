"""Import contract (docs/architecture.md, "Allowed arrows"), checked on the source with ``ast``.

Rooms, lowest first: the foundation modules, ``quote``, ``evidence``, ``validator``, then ``boot`` and
``serve`` side by side, then the composition root (``cli`` + ``commands``). A module may import its own
room or a lower one; ``boot`` and ``serve`` never import each other; ``agent.sim`` (simulation: emulated
hardware, the faithful validator) is reached only from the composition root, so production code can never
fall back to a simulation silently; of the commands only ``agent.commands.boot`` and ``agent.commands.serve``
reach into their rooms (what other commands share with serve, like the evidence collector and the service
identity, lives in ``agent.evidence``). Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"

FOUNDATION = {"agent", "agent.config", "agent.log", "agent.errors", "agent.exitcodes", "agent.fsutil",
              "agent.certs", "agent.checks", "agent.paths"}
RANK = {"foundation": 0, "quote": 1, "evidence": 2, "validator": 3, "boot": 4, "serve": 4, "commands": 5}


def room(module: str) -> str:
    """The room a dotted module name belongs to (``agent.cli`` is part of the composition root)."""
    parts = module.split(".")
    if len(parts) < 2 or module in FOUNDATION:
        return "foundation"
    if parts[1] == "cli":
        return "commands"
    if parts[1] == "sim" or parts[1] in RANK:
        return parts[1]
    return "foundation"


def module_name(path: Path, root: Path = AGENT) -> str:
    """The dotted name of ``path``, a file of the ``agent`` package at ``root``."""
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = AGENT) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("agent")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "agent" or target.startswith("agent."):
                # "from agent import x" may name a submodule: judge by the submodule when it is one.
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    is_module = (root.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                        (root.parent / sub.replace(".", "/") / "__init__.py").exists()
                    found.append((node.lineno, sub if is_module else target))
    return found


def broken_rule(src: str, target: str) -> str | None:
    """Why ``src`` may not import ``target`` (the architecture's rule, in words), or None when it may."""
    src_room, dst_room = room(src), room(target)
    if dst_room == "sim" and src_room not in ("sim", "commands"):
        return "only the composition root may reach agent.sim"
    if src_room == "sim" or dst_room == "sim":
        return None
    if {src_room, dst_room} == {"boot", "serve"}:
        return "boot and serve never import each other"
    if RANK[dst_room] > RANK[src_room]:
        return f"{src_room} may not import the higher room {dst_room}"
    if src_room == "commands" and dst_room in ("boot", "serve") and src != f"agent.commands.{dst_room}":
        # A command that needs what serve or boot computes takes it from a lower room, not their internals.
        return f"only agent.commands.{dst_room} reaches into agent.{dst_room}"
    return None


def violations(root: Path = AGENT) -> list[str]:
    """Every import under the ``agent`` package at ``root`` that breaks a rule, one line each."""
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        src = module_name(path, root)
        for lineno, target in imports_of(path, root):
            why = broken_rule(src, target)
            if why is not None:
                out.append(f"{path.relative_to(root.parent)}:{lineno}: {src} -> {target} ({why})")
    return out


def test_import_contract_holds() -> None:
    found = violations()
    assert not found, "layering violations:\n" + "\n".join(found)


def write_tree(root: Path, modules: dict[str, str]) -> Path:
    """A synthetic ``agent`` package under ``root`` (each module's source given; packages made as needed)."""
    for name, source in modules.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            pkg = root.joinpath(*parts[:i])
            pkg.mkdir(parents=True, exist_ok=True)
            (pkg / "__init__.py").touch()
        path = root.joinpath(*parts).with_suffix(".py")
        if path.with_suffix("").is_dir():
            path = path.with_suffix("") / "__init__.py"
        path.write_text(source)
    return root / "agent"


@pytest.mark.parametrize(("src", "dst", "ok"), [
    ("agent.quote.verify", "agent.evidence.base", False),
    ("agent.evidence.rtmr", "agent.quote", True),
    ("agent.boot.flow", "agent.serve.server", False),
    ("agent.serve.server", "agent.sim.quote_sim", False),
    ("agent.commands.demo", "agent.sim.demo", True),
    ("agent.config", "agent.boot.flow", False),
    ("agent.commands.evidence", "agent.serve.collector", False),
    ("agent.commands.serve", "agent.serve.server", True),
])
@pytest.mark.parametrize("form", ["import", "from", "in_function", "relative"])
def test_the_checker_on_a_synthetic_tree(tmp_path: Path, src: str, dst: str, ok: bool, form: str) -> None:
    """The real checker (:func:`violations`, as the contract test runs it) on a made-up package whose one
    import is the case: a broken checker cannot pass silently, and every import form counts."""
    parent, _, leaf = dst.rpartition(".")
    if form == "relative":
        src_parts, dst_parts = src.split("."), dst.split(".")
        common = 0
        while common < min(len(src_parts) - 1, len(dst_parts) - 1) and src_parts[common] == dst_parts[common]:
            common += 1
        dots = "." * (len(src_parts) - common)
        rest = ".".join(dst_parts[common:-1])
        source = f"from {dots}{rest} import {leaf}\n"
    else:
        source = {"import": f"import {dst}\n", "from": f"from {parent} import {leaf}\n",
                  "in_function": f"def f():\n    from {parent} import {leaf}\n    return {leaf}\n"}[form]
    root = write_tree(tmp_path, {src: source, dst: "X = 1\n"})
    found = violations(root)
    assert [line.split(": ", 1)[1].split(" (")[0] for line in found] == ([] if ok else [f"{src} -> {dst}"]), found


def test_the_checker_sees_the_real_tree() -> None:
    """The contract test walks the real package: a known allowed arrow is seen as an import."""
    imports = imports_of(AGENT / "commands" / "serve.py")
    assert any(target == "agent.serve.server" for _, target in imports), imports
