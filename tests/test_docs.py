"""README.md and docs/*.md state facts that hold: every path they name exists, every engine import and
`python -m engine.X` in them resolves, the defaults they state are the code's, the README stays short, and
no page narrates the tracker's history."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from engine import config
from engine.chunkwise import chunkwise_backward
from engine.options import ChunkOptions

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]

# A repository path as the pages write it: a top-level directory of this repository, then a path, maybe a test
# id (`tests/test_x.py::test_name`). A path with a placeholder (<device>, *) is a template and is skipped.
REPO_DIRS = ("engine", "configs", "bench", "docs", "tests", "launch", "scripts", "docker", ".ci")
DIRS_RE = "|".join(map(re.escape, REPO_DIRS))
PATH_RE = re.compile(rf"(?<![\w./-])((?:{DIRS_RE})/[\w./<>*-]*[\w/>*])(::\w+)?")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def named_paths(text: str) -> set[str]:
    """Repository paths named in Markdown `text`, in prose, code spans and fenced blocks (test ids kept)."""
    return {
        m.group(1) + (m.group(2) or "") for m in PATH_RE.finditer(text) if not re.search(r"[<>*]", m.group(1))
    }


def _exists(path: str) -> bool:
    """A file or directory, or an output stem (`--out bench/results/x` writes x.json, x.png)."""
    target = ROOT / path
    return target.exists() or any(target.parent.glob(glob.escape(target.name) + ".*"))


def links(text: str) -> set[str]:
    """Relative link targets of Markdown `text` (URLs and in-page anchors skipped, anchors cut)."""
    out = set()
    for target in LINK_RE.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        out.add(target.split("#")[0])
    return out


def missing(page: Path, text: str | None = None) -> list[str]:
    """What `page` names that does not exist: repo paths relative to the root, links relative to the page."""
    text = page.read_text() if text is None else text
    bad = []
    for path in sorted(named_paths(text)):
        file, _, test = path.partition("::")
        if not _exists(file):
            bad.append(path)
        elif test and not re.search(rf"^def {re.escape(test)}\b", (ROOT / file).read_text(), re.M):
            bad.append(path)
    bad += [t for t in sorted(links(text)) if not (page.parent / t).exists()]
    return bad


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_path_and_link_exists(page):
    assert missing(page) == [], f"{_rel(page)} names paths that do not exist"


MODULE_RE = re.compile(r"(?<![\w./-])engine/[\w/]*\.py\b")


def stale_modules(text: str) -> list[str]:
    return sorted({m for m in MODULE_RE.findall(text) if not (ROOT / m).exists()})


def test_engine_modules_named_in_code_exist():
    """Comments and docstrings point at modules by path (`engine/kv_cache.py`); a renamed module leaves them
    pointing nowhere."""
    this = Path(__file__).resolve()  # its negative control names a module that does not exist
    stale = [
        f"{_rel(p)}: {m}"
        for p in _files("engine", "tests", "bench", "launch", "scripts")
        if p.suffix == ".py" and p.resolve() != this
        for m in stale_modules(p.read_text())
    ]
    assert stale == [], "comments name modules that do not exist"
    assert stale_modules("# see engine/kv_cache.py and engine/no_such_module.py") == [
        "engine/no_such_module.py"
    ]


def test_the_path_check_catches_a_missing_path():
    text = (
        "See `engine/no_such_module.py`, `tests/test_docs.py::test_no_such_test`, [x](no-such-page.md)\n"
        "```bash\npython bench/no_such_bench.py --out bench/results/x_<device>.json\n```\n"
        "and `tests/test_docs.py::test_the_path_check_catches_a_missing_path`, [d](design.md), `configs/`."
    )
    assert missing(ROOT / "docs" / "page.md", text) == [
        "bench/no_such_bench.py",
        "engine/no_such_module.py",
        "tests/test_docs.py::test_no_such_test",
        "no-such-page.md",
    ]


def test_every_docs_page_is_in_the_readme_index():
    readme = (ROOT / "README.md").read_text()
    assert DOCS, "docs/ has no pages"
    unlisted = [p.name for p in DOCS if f"(docs/{p.name})" not in readme]
    assert unlisted == [], "link these docs/ pages from the README's documentation index"


def test_every_shipped_config_is_in_the_recipe_table():
    page = (ROOT / "docs" / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `(configs/[\w.-]+\.yaml)`", page, re.M))
    shipped = {_rel(p) for p in (ROOT / "configs").glob("*.yaml")}
    assert listed and shipped - listed == set(), "docs/configuration.md's recipe table lacks these configs"


def test_readme_is_at_most_300_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines: move depth into a docs/ page"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_engine_imports_and_modules_resolve(page):
    text = page.read_text()
    for module, names in re.findall(r"^\s*from (engine[\w.]*) import ([\w, ]+)$", text, re.M):
        mod = importlib.import_module(module)
        absent = [n.strip() for n in names.split(",") if not hasattr(mod, n.strip())]
        assert absent == [], f"{_rel(page)}: `from {module} import` names what {module} lacks"
    for module in set(re.findall(r"python -m (engine[\w.]*)", text)):
        assert importlib.util.find_spec(module) is not None, f"{_rel(page)}: no module {module}"


def test_the_readme_api_block_shows_every_parameter_of_the_call():
    readme = (ROOT / "README.md").read_text()
    (call,) = re.findall(r"^stats = chunkwise_backward\(\n(.*?)^\)", readme, re.S | re.M)
    shown = [re.match(r"\s*(\w+)", line).group(1) for line in call.splitlines()]
    assert shown == list(inspect.signature(chunkwise_backward).parameters)


# ------------------------------------------------------------------------------------- stated defaults
def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


# (page, a sentence stating a default, with the value as its one group, the chunking key)
STATED = [
    ("README.md", r"gradients in `kv_grad_dtype` \((\w+) by default", "kv_grad_dtype"),
    ("docs/memory-and-planner.md", r"`chunking\.kv_grad_dtype` \(`ChunkOptions\.kv_grad_dtype`; default (\w+)\)",
     "kv_grad_dtype"),
    ("docs/memory-and-planner.md", r"`chunking\.checkpoint_layers` \((on|off) by default\)", "checkpoint_layers"),
    ("docs/memory-and-planner.md", r"`chunking\.fused_loss` \((on|off) by default", "fused_loss"),
    ("docs/design.md", r"so (\w+) is the default\s+`chunking\.kv_grad_dtype`", "kv_grad_dtype"),
]  # fmt: skip


def stated_default_errors() -> list[str]:
    """Where README.md / docs/ state a chunking default other than the run config's."""
    code, errors = _defaults(config.ChunkingConfig), []
    (line,) = re.findall(r"options=ChunkOptions\(\),\s*# defaults: (.*)", (ROOT / "README.md").read_text())
    for name, value in (kv.strip().split("=") for kv in line.split(",")):
        if value != repr(code[name]).replace("'", '"'):
            errors.append(f"README.md's API block: {name}={value}, the code: {code[name]!r}")
    for page, pattern, key in STATED:
        (value,) = re.findall(pattern, (ROOT / page).read_text())
        want = {True: "on", False: "off"}[code[key]] if isinstance(code[key], bool) else code[key]
        if value != want:
            errors.append(f"{page}: chunking.{key} {value}, the code: {code[key]!r}")
    return errors


def test_stated_defaults_are_the_code_defaults():
    assert stated_default_errors() == []


def test_a_changed_default_is_caught(monkeypatch):
    monkeypatch.setattr(config.ChunkingConfig.__dataclass_fields__["fused_loss"], "default", False)
    monkeypatch.setattr(config.ChunkingConfig.__dataclass_fields__["kv_grad_dtype"], "default", "float32")
    errors = stated_default_errors()
    assert len(errors) == 2 + 1 + 3, errors  # the README API block (2), its prose (1), the docs pages (3)


def test_run_configs_and_chunk_options_share_their_defaults():
    run, options = _defaults(config.ChunkingConfig), _defaults(ChunkOptions)
    assert {k: run[k] for k in options} == options


# --------------------------------------------------------------------------------------- no history
HISTORY = re.compile(r"\bissues? ?#?[0-9]+|\bfixed after\b|\(was [0-9]", re.I)
HASH = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w/.-])")
TEXT = {".py", ".md", ".txt", ".yaml", ".sh", ".sbatch", ".toml"}


def _files(*dirs: str):
    for d in dirs:
        top = ROOT / d
        yield from [top] if top.is_file() else (p for p in sorted(top.rglob("*")) if p.suffix in TEXT)


def test_no_tracker_history_in_code_tests_bench_or_docs():
    this = Path(__file__).resolve()  # holds the patterns and their examples
    hits = [
        f"{_rel(p)}:{n}: {line.strip()[:80]}"
        for p in _files("README.md", "docs", "engine", "tests", "bench", "configs", "launch")
        if p.resolve() != this
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert hits == [], "state facts, not history (issue numbers, 'fixed after', '(was ...')"


def test_no_commit_hashes_in_the_prose():
    hits = [f"{_rel(p)}: {m}" for p in PAGES for m in HASH.findall(p.read_text())]
    assert hits == [], "measured figures cite bench/results/*.json, which records the run; not a commit"


def test_the_history_patterns_match_what_they_should():
    assert HISTORY.search("the goals of issue 10") and HISTORY.search("(Issue #13)")
    assert HISTORY.search("fixed after the run") and HISTORY.search("17.4K (was 4.9K)")
    assert not HISTORY.search("an issue with 0 chunks") and not HISTORY.search("what was 0")
    assert HASH.findall("measured at 8fa429d on") == ["8fa429d"]
    assert HASH.findall("0.1234567 and deadbeef and bench/results/x_8fa429d.json") == []
