"""The documentation cannot drift: the CLI reference is the parsers' help, links resolve, README's
commands are CI's, and the Ray Data snippet runs."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastfeat import cli_docs

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "results" / "README.md"]
DOC_FILES += sorted((ROOT / "docs").glob("*.md"))


def test_cli_reference_is_the_parsers_help():
    page = (ROOT / "docs" / "cli.md").read_text()
    recorded = re.search(r"\(Python (\d+\.\d+), ", page)
    assert recorded, "docs/cli.md has no generator header"
    # On every Python: each command's section names each of its options.
    sections = dict(re.findall(r"^## (fastfeat[^\n]*)\n\n```text\n(.*?)^```", page, re.M | re.S))
    for prog, parser in cli_docs.commands():
        assert prog in sections, f"docs/cli.md lacks `{prog}`: run `{cli_docs.REGENERATE}`"
        missing = sorted(n for n in cli_docs.option_names(parser) if n not in sections[prog] and n != "help")
        assert not missing, f"docs/cli.md's `{prog}` lacks {missing}: run `{cli_docs.REGENERATE}`"
    # On the Python that wrote it (argparse's layout differs a little between versions): the exact text.
    if recorded.group(1) == cli_docs.python_version():
        assert page == cli_docs.render(), f"docs/cli.md differs from the parsers' help: run `{cli_docs.REGENERATE}`"


def test_cli_reference_does_not_depend_on_the_terminal(monkeypatch):
    first = cli_docs.render()
    monkeypatch.setenv("COLUMNS", "40")
    assert cli_docs.render() == first


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _outside_code(text: str) -> str:
    """The markdown without fenced blocks and inline code (no links live there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _outside_code(path.read_text()), re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_every_relative_link_resolves():
    broken = []
    for doc in DOC_FILES:
        if not doc.exists():
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    unlisted = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and f"({p.name}" not in index]
    assert not unlisted, f"docs/README.md does not link {unlisted}"


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'" in readme
    assert "python3 -m venv .venv" in ci and ".venv/bin/pip install -q -e '.[dev]'" in ci
    assert ".venv/bin/python -m pytest -q" in readme and "\n.venv/bin/python -m pytest -q\n" in ci


def test_readme_has_no_hand_copied_synopsis():
    # A hand-copied `fastfeat extract SRC [--opt ...]` block drifts (it once lacked --decode, --threads
    # and the --ray options); README links the generated reference instead.
    readme = (ROOT / "README.md").read_text()
    assert "docs/cli.md" in readme
    assert not re.search(r"^fastfeat \w+ .*\[--", readme, re.M), "README copies a synopsis: link docs/cli.md"


def _ray_data_snippet() -> str:
    text = (ROOT / "docs" / "ray.md").read_text()
    marker = "<!-- tests/test_docs.py runs this block"
    start = text.index("```python\n", text.index(marker)) + len("```python\n")
    return text[start : text.index("\n```", start)]


@pytest.mark.slow
def test_ray_data_snippet_runs(tmp_path, photos):
    pytest.importorskip("ray")
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [Path(p).read_bytes() for p in photos[:2]]
    src = tmp_path / "images"
    src.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "image": images}), src / "part-0.parquet")
    out = tmp_path / "features"
    code = _ray_data_snippet()
    assert '"s3://bucket/images/"' in code and '"caffenet-imagenet"' in code and '"s3://bucket/features/"' in code
    code = (
        code.replace('"s3://bucket/images/"', repr(str(src)))
        .replace('"s3://bucket/features/"', repr(str(out)))
        .replace('"caffenet-imagenet"', '"random:0"')
    )
    # A small object store that never spills (CI's disk was over 95% full once, where Ray refuses to).
    prelude = "import ray\nray.init(num_cpus=2, object_store_memory=768 << 20, include_dashboard=False)\n"
    check = textwrap.dedent(f"""
        import pyarrow.parquet as pq
        t = pq.read_table({str(out)!r})
        assert sorted(t.column("id").to_pylist()) == ["a", "b"], t
        assert t.column("error").null_count == 2 and t.column("relu7").null_count == 0
        assert t.schema.field("relu7").type.list_size == 4096
        print("snippet ok")
    """)
    done = subprocess.run(
        [sys.executable, "-c", prelude + code + check], capture_output=True, text=True, timeout=420, cwd=tmp_path
    )
    assert done.returncode == 0 and "snippet ok" in done.stdout, done.stderr[-3000:]
