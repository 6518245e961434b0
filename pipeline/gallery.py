"""A run's images as one HTML page: a contact sheet people look at instead of reading JSON."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

STATUS_COLOURS = {
    "succeeded": "#2e7d32",
    "skipped": "#607d8b",
    "failed": "#c62828",
    "canceled": "#ef6c00",
}


def image_src(output: dict[str, Any], page: Path) -> str | None:
    """Where the page can load an output from: its public URL, else a local file."""
    if output.get("public_url"):
        return str(output["public_url"])
    uri = str(output.get("uri") or "")
    if uri.startswith("file://"):
        target = Path(unquote(urlsplit(uri).path))
        return Path(os.path.relpath(target, page.parent)).as_posix()
    return None


def _chain(steps: list[dict[str, Any]]) -> str:
    """The steps that made an output, generation first, as a caption."""
    if len(steps) < 2:
        return ""
    parts = []
    for step in steps:
        name = html.escape(str(step["model"]).removeprefix("model_"))
        job = html.escape(str(step.get("job_id") or ""))
        reused = " reused" if step.get("reused") else ""
        parts.append(f'<span class="step{reused}" title="job {job}">{name}</span>')
    return f"<figcaption>{' → '.join(parts)}</figcaption>"


def render(report: dict[str, Any], page: Path) -> str:
    """The HTML document for a run report (as built by Repository.run_report)."""
    esc = html.escape
    cards = []
    for item in report["items"]:
        colour = STATUS_COLOURS.get(item["status"], "#1565c0")
        thumbs = []
        for out in item["outputs"]:
            src = image_src(out, page)
            title = f"{out['uri']}\nsha256 {out['sha256']}\nasset {out['asset_id']}"
            if src:
                image = (
                    f'<a href="{esc(src)}"><img loading="lazy" src="{esc(src)}" '
                    f'title="{esc(title)}" alt="{esc(item["id"])} #{out["index"]}"></a>'
                )
            else:
                image = f'<div class="noimg" title="{esc(title)}">{esc(out["uri"])}</div>'
            thumbs.append(f"<figure>{image}{_chain(out.get('chain') or [])}</figure>")
        error = f'<p class="err">{esc(item["error"])}</p>' if item.get("error") else ""
        hint = f'<p class="hint">{esc(item["hint"])}</p>' if item.get("hint") else ""
        cards.append(
            f'<section class="card"><header><b>{esc(item["id"])}</b>'
            f'<span class="st" style="background:{colour}">{esc(item["status"])}</span></header>'
            f'<div class="thumbs">{"".join(thumbs)}</div>'
            f'<p class="prompt">{esc(item.get("prompt") or "")}</p>'
            f'<p class="meta">seed {item.get("seed")} · attempts {item["attempts"]} · '
            f"{esc(', '.join(item['jobs']))}</p>{error}{hint}</section>"
        )
    c = report["counts"]
    summary = (
        f"{c['succeeded']} succeeded · {c['skipped']} skipped · {c['failed']} failed · "
        f"{c.get('canceled', 0)} canceled of {c['total']} · {report['creative_units']} CU"
    )
    title = f"{report['manifest']['name']} · {report['run_id']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}}
h1{{font-size:20px;margin:0}} .sum{{color:#555;margin:4px 0 20px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:16px}}
.card{{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px}}
.card header{{display:flex;justify-content:space-between;align-items:center}}
.st{{color:#fff;border-radius:4px;padding:1px 6px;font-size:12px}}
.thumbs{{display:flex;flex-wrap:wrap;gap:4px;margin:8px 0}}
.thumbs img{{width:120px;height:120px;object-fit:contain;background:
repeating-conic-gradient(#eee 0 25%,#fff 0 50%) 0 0/16px 16px;border-radius:4px}}
.noimg{{font-size:11px;color:#777;word-break:break-all}}
figure{{margin:0;width:120px}} figcaption{{font-size:10px;color:#555;line-height:1.3}}
.step.reused{{color:#999}} .step.reused::after{{content:" (reused)"}}
.prompt{{margin:4px 0}} .meta{{color:#777;font-size:12px;margin:0}}
.err{{color:#c62828;margin:4px 0 0}} .hint{{color:#ef6c00;margin:2px 0 0}}
</style></head><body>
<h1>{esc(title)} · {esc(report["status"])}</h1>
<p class="sum">{esc(summary)} · manifest {esc(report["manifest"]["path"])}</p>
<div class="grid">{"".join(cards)}</div>
</body></html>
"""


def write(report: dict[str, Any], page: Path) -> Path:
    """Write the gallery page for a run; returns its path."""
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(report, page.resolve()), encoding="utf-8")
    return page
