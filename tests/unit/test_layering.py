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


def module_name(path: Path) -> str:
    rel = path.relative_to(AGENT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
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
                    is_module = (AGENT.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                        (AGENT.parent / sub.replace(".", "/") / "__init__.py").exists()
                    found.append((node.lineno, sub if is_module else target))
    return found


def violations() -> list[str]:
    out: list[str] = []
    for path in sorted(AGENT.rglob("*.py")):
        src = module_name(path)
        src_room = room(src)
        for lineno, target in imports_of(path):
            dst_room = room(target)
            where = f"{path.relative_to(AGENT.parent)}:{lineno}: {src} -> {target}"
            if dst_room == "sim" and src_room not in ("sim", "commands"):
                out.append(f"{where} (only the composition root may reach agent.sim)")
            elif src_room == "sim" or dst_room == "sim":
                continue
            elif {src_room, dst_room} == {"boot", "serve"}:
                out.append(f"{where} (boot and serve never import each other)")
            elif RANK[dst_room] > RANK[src_room]:
                out.append(f"{where} ({src_room} may not import the higher room {dst_room})")
            elif src_room == "commands" and dst_room in ("boot", "serve") and src != f"agent.commands.{dst_room}":
                # A command that needs what serve or boot computes takes it from a lower room, not their internals.
                out.append(f"{where} (only agent.commands.{dst_room} reaches into agent.{dst_room})")
    return out


def test_import_contract_holds() -> None:
    found = violations()
    assert not found, "layering violations:\n" + "\n".join(found)


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
def test_the_rules_themselves(src: str, dst: str, ok: bool) -> None:
    """The checker's own rules, so a broken checker cannot pass silently."""
    s, d = room(src), room(dst)
    if s == "commands" and d in ("boot", "serve"):
        allowed = src == f"agent.commands.{d}"
    elif d == "sim":
        allowed = s in ("sim", "commands")
    elif s == "sim":
        allowed = True
    elif {s, d} == {"boot", "serve"}:
        allowed = False
    else:
        allowed = RANK[d] <= RANK[s]
    assert allowed is ok
