"""MkDocs hooks (mkdocs.yml `hooks:`): pages whose content is generated at build time, so they cannot drift.

- reference/configuration.md: its marker is replaced by the tables of every config section, generated from the
  pydantic models (keplm.jobs.config_reference.config_reference_markdown).
- results.md: its marker is replaced by a list of the reports present under docs/results/<name>/report.md.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_MARKER = "<!-- config-reference -->"
RESULTS_MARKER = "<!-- results-list -->"


def _results_list(docs_dir: Path) -> str:
    reports = sorted((docs_dir / "results").glob("*/report.md"))
    if not reports:
        return ("No report is present yet. `keplm ablate` writes one when `ablate.report_dir` is set, e.g. "
                "`keplm ablate --model smedbert --config configs/ablation-cpu.yaml --output runs/ablation-cpu` "
                "writes `docs/results/ablation-cpu/report.md`.")
    lines = []
    for report in reports:
        rel = report.relative_to(docs_dir).as_posix()
        title = next((ln.lstrip("# ").strip() for ln in report.read_text(encoding="utf-8").splitlines()
                      if ln.startswith("# ")), report.parent.name)
        lines.append(f"- [{report.parent.name}]({rel}): {title}")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "reference/configuration.md" and CONFIG_MARKER in markdown:
        from keplm.jobs.config_reference import config_reference_markdown

        return markdown.replace(CONFIG_MARKER, config_reference_markdown())
    if page.file.src_uri == "results.md" and RESULTS_MARKER in markdown:
        return markdown.replace(RESULTS_MARKER, _results_list(Path(config["docs_dir"])))
    return markdown
