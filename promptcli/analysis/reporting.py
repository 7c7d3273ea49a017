"""Experiment reports as one step: read results, aggregate over seeds, write tables, figures and documents.

Reading is :mod:`promptcli.analysis.results`, aggregation :mod:`promptcli.analysis.aggregate`, the
figure :mod:`promptcli.analysis.figures`; this module renders tables and documents and is the
``report`` command's library step (:func:`make_report`).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptcli.analysis.aggregate import METRICS, Report, aggregate, stats  # noqa: F401  (the report API)
from promptcli.analysis.figures import figure_bytes, figure_png, has_figure
from promptcli.analysis.results import (  # noqa: F401  (the report API)
    GRADSTATS_COLUMNS,
    NO_NOISE,
    NOISE_UNKNOWN,
    Results,
    read_results,
)
from promptcli.errors import InputError
from promptcli.io.checks import one_or_many

OUTPUT_FORMATS = {".html": "html", ".htm": "html", ".png": "png", ".svg": "svg", ".pdf": "pdf", ".md": "md"}

# --- tables ------------------------------------------------------------------------------------------


def format_cell(cell: dict[str, Any] | None) -> str:
    """ "71.2 ± 1.3 (3)" in percent; no ± for a single run; "—" when absent."""
    if cell is None:
        return "—"
    text = f"{100 * cell['mean']:.1f}"
    if cell["std"] is not None:
        text += f" ± {100 * cell['std']:.1f}"
    return f"{text} ({cell['n']})"


def _column_name(noise_type: str, rate: float | None, several_types: bool) -> str:
    if noise_type == NO_NOISE:
        return "0"
    if noise_type == NOISE_UNKNOWN:
        return NOISE_UNKNOWN
    return f"{noise_type} {rate:g}" if several_types else f"{rate:g}"


def table(report: Report, noise_type: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the results table: rows method + loss, columns noise rates.

    With ``noise_type``, only that type's columns (and the noise-free and noise-unknown ones), and only
    rows with a number.
    """
    shared = (noise_type, NO_NOISE, NOISE_UNKNOWN)
    columns = [c for c in report.columns() if noise_type is None or c[0] in shared]
    several = noise_type is None and len(report.noise_types()) > 1
    by_cell = {(c["series"], c["noise_type"], c["noise_rate"]): c for c in report.accuracy}
    series = sorted({s for s, t, r in by_cell if (t, r) in columns})
    header = ["method + loss"] + [_column_name(t, r, several) for t, r in columns]
    rows = [[s] + [format_cell(by_cell.get((s, t, r))) for t, r in columns] for s in series]
    for z in report.zero_shot:
        rows.append([z["label"]] + [format_cell(z)] * max(1, len(columns)))
    if not columns and report.zero_shot:
        header.append("no noise")
    return header, rows


def caption(report: Report, noise_type: str | None = None) -> str:
    types = report.noise_types() if noise_type is None else [noise_type]
    noise = f"{' / '.join(types)} label noise" if types else "no label noise"
    if any(c["noise_type"] == NOISE_UNKNOWN for c in report.accuracy):
        unknown = f"'{NOISE_UNKNOWN}': training labels without a noise rate on record (no noise sidecar)"
        noise = f"{noise}; {unknown}" if types or report.columns()[0][0] == NO_NOISE else unknown
    return (
        f"Test {METRICS[report.metric]} (%) by label-noise rate ({noise}): mean ± sample std over seeds "
        "(number of runs)."
    )


def markdown_table(report: Report) -> str:
    header, rows = table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(report: Report) -> str:
    header, rows = table(report)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


# --- documents ------------------------------------------------------------------------------------------


def _code_line(git: Any) -> str | None:
    """ "abc123... (uncommitted changes)": the git commit a provenance's ``git`` records; None without one."""
    if not isinstance(git, dict) or not git.get("commit"):
        return None
    return f"{git['commit']}" + (" (uncommitted changes)" if git.get("dirty") else "")


def _provenance_lines(report: Report, provenance: dict[str, Any]) -> list[tuple[str, str]]:
    lines = [
        ("promptcli", str(provenance.get("promptcli_version", ""))),
        ("created", str(provenance.get("created", ""))),
        ("command", str(provenance.get("command", ""))),
    ]
    if provenance.get("cwd"):
        lines.append(("cwd", str(provenance["cwd"])))
    code = _code_line(provenance.get("git"))
    if code:
        lines.append(("git commit", code))
    return [*lines, ("models", "; ".join(report.models) or "not recorded")]


def render_markdown(report: Report, provenance: dict[str, Any], title: str, image: str | None = None) -> str:
    parts = [f"# {title}", "", caption(report), "", markdown_table(report), ""]
    if image:
        # <...>: a destination holding spaces or parentheses is still one link (CommonMark)
        parts += [f"![{title}]({f'<{image}>' if any(c in image for c in ' ()') else image})", ""]
    if report.warnings:
        parts += ["**Warnings**", ""] + [f"- {w}" for w in report.warnings] + [""]
    parts += ["## Provenance", ""] + [
        f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in _provenance_lines(report, provenance)
    ]
    parts += ["", "| kind | file | records | sha256 |", "|---|---|---:|---|"]
    parts += [f"| {f.kind} | {f.path} | {f.records} | `{f.sha256[:16]}` |" for f in report.files]
    return "\n".join(parts) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f2f2f2}
img{max-width:100%;height:auto}
.caption{color:#555}
.warn{color:#8a5300}
code{font-size:12px}
"""


def render_html(report: Report, provenance: dict[str, Any], title: str, png: bytes | None) -> str:
    """A self-contained HTML page: the figure (PNG inlined as base64), the table, warnings, provenance."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<img alt="{esc(title)}" src="data:image/png;base64,{data}">')
    parts += [f'<p class="caption">{esc(caption(report))}</p>', html_table(report)]
    if report.warnings:
        parts.append('<ul class="warn">' + "".join(f"<li>{esc(w)}</li>" for w in report.warnings) + "</ul>")
    parts.append("<h2>Provenance</h2><ul>")
    parts += [f"<li>{esc(k)}: <code>{esc(v)}</code></li>" for k, v in _provenance_lines(report, provenance)]
    parts.append(
        "</ul><table><thead><tr><th>kind</th><th>file</th><th>records</th><th>sha256</th></tr></thead><tbody>"
    )
    parts += [
        f"<tr><td>{esc(f.kind)}</td><td>{esc(f.path)}</td><td>{f.records}</td><td><code>{f.sha256}</code></td></tr>"
        for f in report.files
    ]
    parts.append("</tbody></table></body></html>")
    return "\n".join(parts) + "\n"


def output_format(path: str | Path) -> str:
    """html, png, svg, pdf or md, from the output's suffix."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(
            f"unknown report format {Path(path).suffix or '(no suffix)'!r}",
            where=path,
            hint="name the output .html, .png, .svg, .pdf or .md",
        )
    return fmt


def write_report(
    report: Report, outputs: Sequence[Path], provenance: dict[str, Any], title: str = "promptcli report"
) -> list[Path]:
    """Write each output (format from its suffix) through a temporary file renamed into place."""
    from promptcli.io.fileio import atomic_path, write_text_atomic

    formats = [output_format(p) for p in outputs]
    made_by = (f"promptcli {provenance.get('promptcli_version', '')}", str(provenance.get("command", "")))
    png = (
        figure_png(report, title, made_by=made_by)
        if has_figure(report) and ("png" in formats or "html" in formats)
        else None
    )
    png_paths = [p for p, f in zip(outputs, formats) if f == "png"]
    for path, fmt in zip(outputs, formats):
        if fmt in ("png", "svg", "pdf"):
            if not has_figure(report):
                unknown = bool(report.accuracy)  # runs there are, all of unknown noise: table only
                raise InputError(
                    "nothing to draw"
                    + (": every run's noise rate is unknown (no noise sidecar)" if unknown else ""),
                    where=path,
                    hint="write the table instead (-o report.md or .html)"
                    if unknown
                    else "give results with numbers",
                )
            with atomic_path(path, suffix=f".{fmt}") as tmp:
                tmp.write_bytes(png if fmt == "png" else figure_bytes(report, title, fmt, made_by=made_by))
        elif fmt == "html":
            write_text_atomic(path, render_html(report, provenance, title, png))
        else:
            image = next((p for p in png_paths if p.resolve().parent == path.resolve().parent), None)
            write_text_atomic(path, render_markdown(report, provenance, title, image.name if image else None))
    return list(outputs)


def make_report(
    results: Sequence[str | Path],
    outputs: Sequence[Path] = (),
    *,
    metric: str = "top1",
    curve_rate: float | None = None,
    title: str = "promptcli report",
    force: bool = False,
) -> Report:
    """``promptcli report`` as one step: check the outputs, read and aggregate the results, write the documents."""
    from promptcli.io.fileio import check_output_path
    from promptcli.io.provenance import base_provenance

    results, outputs = one_or_many(results), one_or_many(outputs)
    if curve_rate is not None and not (math.isfinite(curve_rate) and 0.0 <= curve_rate <= 1.0):
        raise InputError(
            f"must be a noise rate in [0, 1], got {curve_rate}",
            where="--curve-rate",
            hint="e.g. --curve-rate 0.5",
        )
    seen: set[Path] = set()
    for path in outputs:
        output_format(path)
        if Path(path).resolve() in seen:
            raise InputError("the same output is given twice", where=path, hint="give each -o once")
        seen.add(Path(path).resolve())
        check_output_path(path, force)
    report = aggregate(read_results(results), metric=metric, curve_rate=curve_rate)
    if outputs:
        write_report(report, [Path(p) for p in outputs], base_provenance(), title=title)
    return report
