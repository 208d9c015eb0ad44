"""Every file or folder of this repository that README.md, docs/*.md or a source file
names exists (and every section of a document that a source file names).

A reference is a markdown link target, a `code span` that reads as a path, or a markdown
file named in the text (``DESIGN.md``: at the top of the repository or in ``docs/``). A
path is checked when it starts with a folder of the repository (``docs/``, ``tests/``,
``benchmarks/``, ...) or with a part of the package (``planning/planner.py``, ``quant/``,
looked up in ``bitalloc/``). Paths of other projects (``hqq/core/quantize.py``) and of a
user's files (``OUT/adapter/``) start with neither and are not checked."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bitalloc"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("docs", "tests", "benchmarks", "bitalloc", "examples")
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"^\w[\w.-]*(?:/[\w.*-]+)*/?$")
MARKDOWN = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")


def _candidate(text: str) -> str | None:
    """The path a code span or link names (a command's script, ``file::name`` -> file)."""
    text = text.strip()
    words = text.split()
    if len(words) > 1 and words[0] in ("python", "python3", "pytest"):
        text = words[1]
    elif len(words) > 1:
        text = words[0].rstrip(":")
    text = text.split("::", 1)[0].split("#", 1)[0]
    if "/" not in text or "://" in text or not PATH.match(text):
        return None
    return text


def _is_package_part(path: str) -> bool:
    first = path.split("/", 1)[0]
    return first != "__pycache__" and (PACKAGE / first).is_dir()


def references(document: Path) -> list[tuple[int, str, Path]]:
    """(line, reference, where it should be) for every repository path ``document`` names."""
    found = []
    for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
        for link in LINK.findall(line):
            target = link.split("#", 1)[0]
            if target and "://" not in target and not target.startswith("mailto:"):
                found.append((number, link, document.parent / target))
        for span in SPAN.findall(line):
            path = _candidate(span)
            if path is None or "*" in path:
                continue
            if path.split("/", 1)[0] in TOP:
                found.append((number, span, ROOT / path))
            elif _is_package_part(path):
                found.append((number, span, PACKAGE / path))
        for name in MARKDOWN.findall(line):
            if not (ROOT / name).exists():
                found.append((number, name, ROOT / "docs" / name))
    return found


SOURCES = ("bitalloc", "tests", "benchmarks", "examples")
CODE = sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py"))
CODE_PATH = re.compile(r"(?<![\w/.-])((?:docs|bitalloc|tests|benchmarks|examples)/[\w/.-]*\w)")
SECTION = re.compile(r"((?:docs/)?[\w-]+\.md), \"([^\"]+)\"")  # docs/x.md, "Heading"


def code_references(path: Path) -> list[tuple[int, str, Path]]:
    """(line, reference, where it should be) for the repository paths a source file names
    (``docs/apply.md``, ``bitalloc/__init__``: a module may be named without ``.py``; a
    bare ``NAME.md``: at the top of the repository or in ``docs/``) and
    the sections of documents it names (``docs/reliability.md, "Hostile classes"``: the
    document must have a heading that holds that text)."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for ref in CODE_PATH.findall(line):
            if not ref.rsplit("/", 1)[-1].isupper():  # tests/data/export/NAME: a placeholder
                where = ROOT / ref
                module = where.with_name(where.name + ".py")
                found.append((number, ref, module if module.exists() else where))
        for name in MARKDOWN.findall(line):  # a bare name: at the top or in docs/
            if not (ROOT / name).exists():
                found.append((number, name, ROOT / "docs" / name))
        for document, heading in SECTION.findall(line):
            where = ROOT / document if "/" in document else ROOT / "docs" / document
            text = where.read_text(encoding="utf-8") if where.is_file() else ""
            has = any(t.startswith("#") and heading in t for t in text.splitlines())
            found.append((number, f'{document}, "{heading}"', where if has else where / heading))
    return found


@pytest.mark.parametrize("source", [p for p in CODE if p.name != "test_docs_links.py"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())  # fmt: skip
def test_every_path_and_section_a_source_file_names_exists(source):
    missing = [
        f"{source.relative_to(ROOT)}:{line}: {ref} ({where.relative_to(ROOT)} does not exist)"
        for line, ref, where in code_references(source)
        if not where.exists()
    ]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_referenced_repository_path_exists(document):
    missing = [
        f"{document.relative_to(ROOT)}:{line}: {ref} ({where.relative_to(ROOT)} does not exist)"
        for line, ref, where in references(document)
        if not where.exists()
    ]
    assert not missing, "\n".join(missing)


def test_the_scan_finds_paths_and_skips_other_projects(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See `docs/benchmarks.md`, `planning/planner.py::plan`, `python benchmarks/bench_sizes.py --x`,\n"
        "[a](docs/nowhere.md), `hqq/core/quantize.py`, `OUT/adapter/`, `tests/*.py`, https://x.org/a/b\n"
        "as README.md and DESIGN.md say, [up](../quantized)\n",
        encoding="utf-8",
    )
    found = {(line, ref) for line, ref, _ in references(page)}
    assert found == {
        (1, "docs/benchmarks.md"),
        (1, "planning/planner.py::plan"),
        (1, "python benchmarks/bench_sizes.py --x"),
        (2, "docs/nowhere.md"),
        (3, "DESIGN.md"),
        (3, "../quantized"),
    }
    where = {ref: path for _, ref, path in references(page)}
    assert where["planning/planner.py::plan"] == PACKAGE / "planning" / "planner.py"
    assert where["docs/nowhere.md"] == tmp_path / "docs" / "nowhere.md"
    assert where["DESIGN.md"] == ROOT / "docs" / "DESIGN.md"
