"""Docs that run: every shell command of README.md and the model cards is accounted for.

Each command in a fenced ``bash``/``sh``/``shell``/``console`` block (continuations joined, comment lines
skipped) must be either

- marked as not runnable here with ``# needs: <reason>`` (trailing, or a whole comment line that covers the
  commands below it up to the next blank line of the block), or
- registered in ``doc_commands.json`` (doc -> command -> ``tests/<file>.py::<test>``) as executed by that test
  with demo data substituted; the test must exist and its source (with the module-level helpers, fixtures
  and constants it names) must hold the command's essential tokens, so a registration cannot go stale
  silently, or
- a ``pytest`` run of paths under ``tests/`` (the suite itself).

A line that starts with ``--`` is a list of overrides to add to the bundle's commands, not a command: each of
its keys must be a top-level key of one of the bundle's configs.

Independently of the marks, files and configs a command names must exist, ``python -c`` imports must name
functions that exist, and the ``--key`` overrides of ``python -m monai.bundle run`` must be keys of the
configs it runs (MONAI adds an unknown key silently and the run ignores it). Convention: CONTRIBUTING.md.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # importlib mode: the helper module sits beside this file
    sys.path.insert(0, str(Path(__file__).parent))

from doc_commands import ROOT, Command, all_commands, commands  # noqa: E402

REGISTRY_FILE = Path(__file__).with_name("doc_commands.json")
# arguments of monai.bundle.scripts.run itself, not config keys
RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
FILE_LIKE = re.compile(r"^(configs|ci|benchmarks|scripts|tests|common|bundles)/|\.(py|sh)$|^requirements[\w-]*\.txt$")
PLACEHOLDER = re.compile(r"[<>$]")

COMMANDS = all_commands()


def _registry() -> dict[str, dict[str, str]]:
    return json.loads(REGISTRY_FILE.read_text())


def _words(cmd: Command) -> list[str]:
    return shlex.split(cmd.text)


def _bundle_dir(cmd: Command) -> Path | None:
    if cmd.doc.startswith("bundles/"):
        return ROOT / Path(cmd.doc).parents[1]
    if cmd.cwd:
        return ROOT / cmd.cwd
    return None


def _segments(words: list[str]) -> list[list[str]]:
    """Split at ``&&``, ``||``, ``;`` and ``|``; drop leading ``VAR=value`` assignments."""
    segs, cur = [], []
    for w in words + ["&&"]:
        if w in ("&&", "||", ";", "|"):
            while cur and re.match(r"^[A-Za-z_]\w*=", cur[0]):
                cur = cur[1:]
            if cur:
                segs.append(cur)
            cur = []
        else:
            cur.append(w)
    return segs


def _config_files(words: list[str]) -> list[str]:
    """Config files of a ``monai.bundle run`` (``--config_file`` value, a path or a list literal)."""
    if "--config_file" not in words:
        return []
    value = words[words.index("--config_file") + 1]
    return list(ast.literal_eval(value)) if value.startswith("[") else [value]


def _is_python(word: str) -> bool:
    return Path(word).name.startswith("python")


def _module(seg: list[str]) -> str | None:
    if ("-m" in seg) and (_is_python(seg[0]) or seg[0] == "torchrun"):
        return seg[seg.index("-m") + 1]
    return None


def _imports(seg: list[str]) -> list[tuple[str, str]]:
    """(module, name) pairs imported by the code of ``python -c``."""
    if not (_is_python(seg[0]) and "-c" in seg):
        return []
    tree = ast.parse(seg[seg.index("-c") + 1])
    return [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]


def _paths(cmd: Command) -> list[str]:
    """Repository files the command names (placeholders, absolute paths and outputs left aside)."""
    out = []
    for seg in _segments(_words(cmd)):
        for w in seg[1:]:
            for value in (ast.literal_eval(w) if w.startswith("['") else [w]):
                if isinstance(value, str) and FILE_LIKE.search(value) and not PLACEHOLDER.search(value):
                    out.append(value)
        if seg[0].endswith(".sh") or "/" in seg[0] and not _is_python(seg[0]):
            if not seg[0].startswith(".venv"):
                out.append(seg[0])
    return out


def essential_tokens(cmd: Command) -> list[str]:
    """What the executing test's source must name: modules and scripts run, functions called, configs."""
    tokens = []
    for seg in _segments(_words(cmd)):
        mod = _module(seg)
        if mod and mod != "monai.bundle":
            tokens.append(mod.rsplit(".", 1)[-1])
        if (_is_python(seg[0]) or seg[0] in ("bash", "sh")) and len(seg) > 1 and seg[1].endswith((".py", ".sh")):
            tokens.append(Path(seg[1]).stem)
        tokens += [name for _, name in _imports(seg)]
    tokens += [Path(p).name for p in _paths(cmd) if p.endswith(".json")]
    return list(dict.fromkeys(tokens))


def _is_fragment(cmd: Command) -> bool:
    """A line of overrides to add to the bundle's commands (``--key value ...``), not a command."""
    return cmd.text.startswith("-")


def _is_suite_run(cmd: Command) -> bool:
    for seg in _segments(_words(cmd)):
        if _module(seg) == "pytest" or Path(seg[0]).name == "pytest":
            targets = [w for w in seg[1:] if not w.startswith("-") and w != "pytest" and w != "-m"]
            return all(w.startswith("tests") for w in targets)
    return False


@functools.cache
def _module_source(path: Path) -> tuple[str, dict[str, ast.AST]]:
    text = path.read_text()
    tree = ast.parse(text)
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        defs[n.id] = node
    return text, defs


def _source_of_test(node_id: str) -> str:
    """Source of the test ``tests/<file>.py::<name>`` and of the module-level names it uses, transitively."""
    file, _, name = node_id.partition("::")
    path = ROOT / file
    assert path.is_file(), f"registered test file {file} does not exist"
    text, defs = _module_source(path)
    assert name in defs and isinstance(defs[name], (ast.FunctionDef, ast.AsyncFunctionDef)), (
        f"no test function {name} in {file}"
    )
    seen, todo, parts = set(), [name], []
    while todo:
        n = todo.pop()
        if n in seen or n not in defs:
            continue
        seen.add(n)
        node = defs[n]
        parts.append(ast.get_source_segment(text, node) or "")
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                todo.append(sub.id)
            elif isinstance(sub, ast.arg):
                todo.append(sub.arg)
    return "\n".join(parts)


def _ids(cmds):
    return [f"{c.doc}:{c.line}" for c in cmds]


def test_commands_are_found():
    assert len(COMMANDS) > 40
    assert {c.doc for c in COMMANDS} >= {"README.md"} | {
        p.relative_to(ROOT).as_posix() for p in ROOT.glob("bundles/*/docs/README.md")
    }


@pytest.mark.parametrize("cmd", COMMANDS, ids=_ids(COMMANDS))
def test_command_is_marked_or_executed(cmd):
    registered = cmd.text in _registry().get(cmd.doc, {})
    if cmd.needs is None and not registered and not _is_suite_run(cmd) and not _is_fragment(cmd):
        pytest.fail(
            f"{cmd.doc}:{cmd.line}: `{cmd.text}` is neither marked `# needs: <reason>` nor registered in "
            f"{REGISTRY_FILE.name} as run by a test (see CONTRIBUTING.md, 'Commands in the docs')",
            pytrace=False,
        )
    if cmd.needs is not None and not cmd.needs:
        pytest.fail(f"{cmd.doc}:{cmd.line}: `# needs:` without a reason", pytrace=False)


def test_registry_entries_name_commands_and_tests_that_run_them():
    problems = []
    by_doc: dict[str, set[str]] = {}
    for c in COMMANDS:
        by_doc.setdefault(c.doc, set()).add(c.text)
    for doc, entries in _registry().items():
        for text, node_id in entries.items():
            if text not in by_doc.get(doc, set()):
                problems.append(f"{doc}: registered command not in the doc (stale?): `{text}`")
                continue
            cmd = next(c for c in COMMANDS if c.doc == doc and c.text == text)
            try:
                source = _source_of_test(node_id)
            except AssertionError as e:
                problems.append(f"{doc}: `{text}`: {e}")
                continue
            missing = [t for t in essential_tokens(cmd) if t not in source]
            if missing:
                problems.append(f"{doc}: `{text}`: {node_id} does not name {missing}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cmd", COMMANDS, ids=_ids(COMMANDS))
def test_named_files_configs_and_functions_exist(cmd):
    bundle = _bundle_dir(cmd)
    bases = [b for b in (bundle, ROOT) if b is not None]
    missing = [p for p in _paths(cmd) if not any((b / p).exists() for b in bases)]
    assert not missing, f"{cmd.doc}:{cmd.line}: `{cmd.text}` names files that do not exist: {missing}"
    for seg in _segments(_words(cmd)):
        mod = _module(seg)
        if mod and mod.split(".")[0] == "common":
            assert (ROOT / (mod.replace(".", "/") + ".py")).is_file(), f"{cmd.doc}:{cmd.line}: no module {mod}"
        for module, name in _imports(seg):
            if module.split(".")[0] != "common":
                continue
            path = ROOT / (module.replace(".", "/") + ".py")
            assert path.is_file(), f"{cmd.doc}:{cmd.line}: no module {module}"
            assert name in _module_source(path)[1], f"{cmd.doc}:{cmd.line}: {module} has no {name}"


BUNDLE_RUNS = [c for c in COMMANDS if any(_module(s) == "monai.bundle" and "run" in s for s in _segments(_words(c)))]
FRAGMENTS = [c for c in COMMANDS if _is_fragment(c)]


@pytest.mark.parametrize("cmd", BUNDLE_RUNS, ids=_ids(BUNDLE_RUNS))
def test_bundle_run_overrides_are_config_keys(cmd):
    from monai.bundle import ConfigParser

    bundle = _bundle_dir(cmd)
    assert bundle is not None, f"{cmd.doc}:{cmd.line}: no bundle folder for `{cmd.text}` (add `cd bundles/<name>`)"
    seg = next(s for s in _segments(_words(cmd)) if _module(s) == "monai.bundle")
    parser = ConfigParser()
    parser.read_config([str(bundle / f) for f in _config_files(seg)])
    args = seg[seg.index("run") + 1 :]
    keys = [w[2:] for w in args if w.startswith("--") and w[2:] not in RUN_ARGS]
    unknown = [k for k in keys if k not in parser]
    if unknown:
        pytest.fail(
            f"{cmd.doc}:{cmd.line}: `{cmd.text}` overrides keys that none of its configs defines: {unknown}",
            pytrace=False,
        )


def test_the_checks_catch_wrong_names_and_read_the_markers(tmp_path):
    """The extraction and the checks themselves, on a made-up card."""
    doc = ROOT / "bundles" / "diffseg" / "docs" / "README.md"
    card = tmp_path / "README.md"
    card.write_text(
        "```bash\n# needs: a GPU\npython -m monai.bundle run --config_file configs/nope.json \\\n    --x 1\n"
        "python -m monai.bundle run --config_file configs/inference.json --no_such_key 1   # needs: AMOS data\n\n"
        "python -m monai.bundle run --config_file \"['configs/inference.json','configs/evaluate.json']\"\n"
        "# needs:\npython -c \"from common.data.seg_datalists import build_nothing\"\n"
        "--modality MR --no_such_key 9\n```\n"
    )
    cmds = commands(card, doc.relative_to(ROOT).as_posix())  # files resolve against the diffseg bundle
    assert [c.needs for c in cmds] == ["a GPU", "AMOS data", None, "", ""]
    assert cmds[0].text == "python -m monai.bundle run --config_file configs/nope.json --x 1"
    with pytest.raises(AssertionError, match="configs/nope.json"):
        test_named_files_configs_and_functions_exist(cmds[0])
    with pytest.raises(pytest.fail.Exception, match="no_such_key"):
        test_bundle_run_overrides_are_config_keys(cmds[1])
    test_bundle_run_overrides_are_config_keys(cmds[2])
    with pytest.raises(pytest.fail.Exception, match="neither marked"):
        test_command_is_marked_or_executed(cmds[2])
    with pytest.raises(pytest.fail.Exception, match="without a reason"):
        test_command_is_marked_or_executed(cmds[3])
    with pytest.raises(AssertionError, match="has no build_nothing"):
        test_named_files_configs_and_functions_exist(cmds[3])
    assert essential_tokens(cmds[2]) == ["inference.json", "evaluate.json"]
    assert _is_fragment(cmds[4])
    with pytest.raises(pytest.fail.Exception, match="no_such_key"):
        test_override_lines_are_config_keys(cmds[4])


@pytest.mark.parametrize("cmd", FRAGMENTS, ids=_ids(FRAGMENTS))
def test_override_lines_are_config_keys(cmd):
    """A line of overrides (``--modality MR --num_classes 9 ...``) names top-level keys of the bundle's configs."""
    bundle = _bundle_dir(cmd)
    assert bundle is not None, f"{cmd.doc}:{cmd.line}: overrides outside a bundle's card"
    keys = [w[2:] for w in _words(cmd) if w.startswith("--")]
    unknown = set(keys)
    for config in (bundle / "configs").glob("*.json"):
        raw = json.loads(config.read_text())
        unknown -= {k for k in unknown if isinstance(raw, dict) and k in raw}
    if unknown:
        pytest.fail(f"{cmd.doc}:{cmd.line}: no config of {bundle.name} defines {sorted(unknown)}", pytrace=False)
