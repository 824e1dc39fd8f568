"""The documentation site: every config key is described, the configuration reference is generated from the
pydantic sections, and `mkdocs build --strict` builds a page for every job and every config section (about 10 s,
so in the quick tier)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keplm.config import KeplmConfig
from keplm.jobs.cli import build_parser
from keplm.jobs.config_reference import SECTION_INTROS, config_reference_markdown, section_docs, top_level_sections

ROOT = Path(__file__).resolve().parents[1]


def _subcommands(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


def job_names() -> list[str]:
    return list(_subcommands(build_parser()))


def test_every_config_key_has_a_description():
    missing = [row.key for doc in section_docs() for row in doc.rows if not row.description.strip()]
    missing += [doc.key for doc in section_docs() if "." in doc.key and not doc.description.strip()]
    assert not missing, f"config keys without a Field description: {missing}"


def test_every_top_level_section_has_an_intro():
    assert set(top_level_sections()) == set(SECTION_INTROS)
    assert set(top_level_sections()) == set(KeplmConfig.model_fields)


def test_reference_lists_every_section_and_key():
    md = config_reference_markdown()
    for doc in section_docs():
        assert f"`{doc.key}`" in md
        for row in doc.rows:
            assert f"| `{row.key}` |" in md
    # a few rows, exactly: type, default, bounds
    assert "| `prepare.max_seq_len` | `int` | `512` | ≥ 8 |" in md
    assert "| `pepr.alpha` | `float` | `0.15` | > 0, < 1 |" in md
    assert "| `train.use_gpu` | `bool | None` | unset |  |" in md
    assert "| `evaluate.tasks.<name>.kind` |" in md and "required" in md
    assert "### `prepare.vocab`" in md and "### `batches.segment`" in md


def test_every_job_has_a_docs_page():
    for job in job_names():
        assert (ROOT / "docs" / "jobs" / f"{job}.md").is_file(), f"docs/jobs/{job}.md is missing"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    site = tmp_path / "site"
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for job in job_names():
        page = site / "jobs" / job / "index.html"
        assert page.is_file(), f"no built page for keplm {job}"
        assert f"keplm {job}" in page.read_text(encoding="utf-8")
    kg_page = (site / "jobs" / "kg" / "index.html").read_text(encoding="utf-8")
    for step in _subcommands(_subcommands(build_parser())["kg"]):
        assert f'id="kg-{step}"' in kg_page, f"the kg page has no section for kg {step}"

    reference = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "config-reference" not in reference, "the hook did not replace the placeholder"
    for section in top_level_sections():
        assert f'id="{section}"' in reference, f"the configuration page has no section {section}"
    for doc in section_docs():
        assert f"<code>{doc.key.replace('<', '&lt;').replace('>', '&gt;')}</code>" in reference
    for layer in ("platform", "kg", "models", "tuning"):
        assert (site / "api" / layer / "index.html").is_file()
