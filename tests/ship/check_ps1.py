"""Syntax check for PowerShell scripts without PowerShell: parse with tree-sitter's grammar.

    python check_ps1.py deploy.ps1 [more.ps1 ...]

Fails (exit 1) when the tree has an ERROR or MISSING node, printing each with its line and
the source text around it; prints "ok <file> (<n> nodes)" otherwise.
"""

from __future__ import annotations

import sys

import tree_sitter_powershell
from tree_sitter import Language, Node, Parser


def problems(root: Node) -> list[Node]:
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            found.append(node)
        stack.extend(node.children)
    return sorted(found, key=lambda n: n.start_byte)


def count(root: Node) -> int:
    total, stack = 0, [root]
    while stack:
        node = stack.pop()
        total += 1
        stack.extend(node.children)
    return total


def check(path: str, parser: Parser) -> bool:
    source = open(path, "rb").read()
    tree = parser.parse(source)
    bad = problems(tree.root_node)
    lines = source.decode("utf-8", "replace").splitlines()
    for node in bad:
        row, col = node.start_point
        kind = f"MISSING {node.type}" if node.is_missing else "ERROR"
        text = lines[row] if row < len(lines) else ""
        print(f"{path}:{row + 1}:{col + 1}: {kind}\n    {text.strip()}")
    if tree.root_node.has_error and not bad:
        print(f"{path}: parse tree reports an error")
        return False
    if not bad:
        print(f"ok {path} ({count(tree.root_node)} nodes)")
    return not bad


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    parser = Parser(Language(tree_sitter_powershell.language()))
    results = [check(path, parser) for path in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
