"""Render a run's OUT/report.md to one self-contained HTML page (pictures inlined) and, with headless
Chromium, to a PNG screenshot: what the report looks like to a person (issue 42).

    PYTHONPATH=. python benchmarks/render_report.py OUT --html report.html --png benchmarks/results/run_report.png

The converter knows only what zsq.run_report writes: headings, paragraphs, pipe tables, images, bullet
lists and `code` spans.
"""
from __future__ import annotations

import argparse
import base64
import html
import re
import shutil
import subprocess
from pathlib import Path

CSS = ("body{font-family:sans-serif;max-width:1100px;margin:24px auto;color:#222}table{border-collapse:collapse;"
       "margin:8px 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}code{background:#f3f3f3}"
       "img{max-width:100%;border:1px solid #ddd}h1{font-size:22px}h2{font-size:18px;margin-top:24px}")


def _inline(text: str) -> str:
    text = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def to_html(md: str, base: Path) -> str:
    out, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not re.match(r"^\|[-| ]+\|$", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{_inline(c)}</{'th' if i == 0 else 'td'}>" for c in row)
                + "</tr>" for i, row in enumerate(cells)) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        img = re.match(r"!\[([^\]]*)\]\(([^)]+)\)", line)
        if img:
            data = base64.b64encode((base / img.group(2)).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(img.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return f"<!doctype html><meta charset='utf-8'><style>{CSS}</style>" + "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a zsq quantize --out folder")
    ap.add_argument("--html", required=True)
    ap.add_argument("--png", help="screenshot (needs chromium)")
    ap.add_argument("--height", type=int, default=2600)
    args = ap.parse_args()
    out = Path(args.out)
    page = Path(args.html).resolve()
    page.write_text(to_html((out / "report.md").read_text(), out))
    if args.png:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise SystemExit("no chromium on PATH (apt-get install chromium)")
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size=1200,{args.height}", f"--screenshot={Path(args.png).resolve()}",
                        page.as_uri()], check=True, capture_output=True, timeout=300)


if __name__ == "__main__":
    main()
