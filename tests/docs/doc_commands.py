"""Shell commands of README.md and the model cards (bundles/*/docs/README.md), as a user types them.

Helpers for ``test_doc_commands.py``; the convention is in CONTRIBUTING.md ("Commands in the docs").
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NEEDS = re.compile(r"^needs:\s*(.*)$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted(ROOT.glob("bundles/*/docs/README.md"))


@dataclass
class Command:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the command's first physical line
    text: str  # the command, continuations joined, trailing comment removed, whitespace collapsed
    needs: str | None  # reason from a `# needs:` marker, None when unmarked
    cwd: str | None  # folder set by an earlier `cd` in the same block (relative to the root), if any

    @property
    def key(self) -> str:
        return self.text


def split_comment(line: str) -> tuple[str, str | None]:
    """Split ``line`` at the first unquoted ``#`` that starts a word: (code, comment text or None)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), None


def _marker(comment: str | None) -> str | None:
    if comment is None:
        return None
    m = NEEDS.match(comment)
    return m.group(1).strip() if m else None


def shell_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(line number of the first line inside the block, lines) of each fenced bash/sh/shell/console block."""
    blocks, cur, fence, start = [], None, None, 0
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        m = FENCE.match(line)
        if cur is None and fence is None:
            if m:
                fence = m.group(2)
                if m.group(3).lower() in SHELL_LANGS:
                    cur, start = [], n + 1
        elif m and m.group(2).startswith(fence[0]) and len(m.group(2)) >= len(fence) and not m.group(3):
            if cur is not None:
                blocks.append((start, cur))
            cur, fence = None, None
        elif cur is not None:
            cur.append(line)
    return blocks


def commands(path: Path, doc: str | None = None) -> list[Command]:
    """Every command of ``path``'s shell blocks, with its marker (see CONTRIBUTING.md); ``doc`` names the
    document (default: ``path`` relative to the repository root)."""
    rel = doc or path.relative_to(ROOT).as_posix()
    out: list[Command] = []
    for start, lines in shell_blocks(path):
        scope_needs: str | None = None  # from a whole-line `# needs:` comment, until a blank line
        cwd: str | None = None
        i = 0
        while i < len(lines):
            raw = lines[i].strip()
            first = start + i
            i += 1
            if not raw:
                scope_needs = None
                continue
            if raw.startswith("$ "):  # console prompt
                raw = raw[2:]
            if raw.startswith("#"):
                reason = _marker(raw[1:].strip())
                if reason is not None:
                    scope_needs = reason
                continue
            parts, comment = [], None
            while True:
                code, comment = split_comment(raw)
                if code.endswith("\\") and i < len(lines):
                    parts.append(code[:-1].strip())
                    raw = lines[i].strip()
                    i += 1
                    continue
                parts.append(code.strip())
                break
            text = " ".join(" ".join(parts).split())
            if not text:
                continue
            words = shlex.split(text)
            if words[0] == "cd" and len(words) == 2:
                cwd = words[1]
                continue
            needs = _marker(comment)
            if needs is None:
                needs = scope_needs
            out.append(Command(rel, first, text, needs, cwd))
    return out


def all_commands() -> list[Command]:
    return [c for p in doc_files() for c in commands(p)]
