#!/usr/bin/env python3
"""Side-by-side table of `brushfire bench --json` and `bench_diffusers.py --json` reports.

    python tests/python/compare_bench.py --brushfire b1.json b16.json --diffusers d1.json d16.json

One table per (pipeline, size, batch): every settings column of each tool with its it/s and peak
memory, then the ratio Brushfire ÷ diffusers per column, and Brushfire's best column against
diffusers' best (its compiled column when it ran). Ratios only mean something when both reports
come from the same machine in one session; the header names each report's backend.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

COLUMNS = ["baseline", "fused", "fusion", "channels-last"]
LABELS = {
    "baseline": "baseline (vanilla attention)",
    "fused": "fused attention",
    "fusion": "fused + fusion / compile",
    "channels-last": "+ channels-last",
}


def load(paths):
    reports, cells = [], {}
    for path in paths or []:
        p = pathlib.Path(path)
        if not p.is_file():
            print(f"(missing: {p})", file=sys.stderr)
            continue
        report = json.loads(p.read_text())
        reports.append(report)
        for c in report["cells"]:
            key = (c["pipeline"], c["width"], c["height"], c["batch"], c["column"])
            cells[key] = c
    return reports, cells


def rate(cell):
    if not cell or cell.get("status") != "measured":
        return None
    stages = cell.get("stages")
    return [s["it_per_sec"] for s in stages] if stages else [cell["it_per_sec"]]


def rate_text(rate: float) -> str:
    """Two decimals; three significant digits below 1, as both tools' tables."""
    if abs(rate) >= 1.0 or rate == 0.0:
        return f"{rate:.2f}"
    decimals = int(min(6, max(2, 2 - math.floor(math.log10(abs(rate))))))
    return f"{rate:.{decimals}f}"


def text(cell):
    if cell is None:
        return "—"
    if cell.get("status") != "measured":
        return "not run: " + str(cell.get("reason", "")).replace("|", "/")[:80]
    rates = " / ".join(rate_text(r) for r in rate(cell))
    mem = cell.get("peak_reserved_bytes")
    return f"{rates} it/s" + (f" ({mem / 2**30:.2f} GiB)" if mem else "")


def ratio(a, b):
    ra, rb = rate(a), rate(b)
    if not ra or not rb:
        return "—"
    return " / ".join(f"{x / y:.2f}×" for x, y in zip(ra, rb))


def best(cells):
    measured = [c for c in cells if rate(c)]
    return max(measured, key=lambda c: rate(c)[0], default=None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brushfire", nargs="*", default=[])
    parser.add_argument("--diffusers", nargs="*", default=[])
    parser.add_argument("--markdown")
    args = parser.parse_args()
    ours_reports, ours = load(args.brushfire)
    theirs_reports, theirs = load(args.diffusers)
    out = []
    # One line per distinct setup (one report per measured cell says the same thing many times).
    for name, reports in (("Brushfire", ours_reports), ("diffusers", theirs_reports)):
        for line in dict.fromkeys(
            f"- {name}: {r.get('backend')}, {r.get('precision')}, {r.get('steps')} steps, run {r.get('runs')} of {r.get('runs')}"
            for r in reports
        ):
            out.append(line)
    out.append("")
    groups = sorted({k[:4] for k in list(ours) + list(theirs)}, key=lambda g: (g[0], g[1], g[2], g[3]))
    for pipeline, width, height, batch in groups:
        out.append(f"### {pipeline}, {width}×{height}, batch {batch}\n")
        out.append("| column | Brushfire | diffusers | Brushfire ÷ diffusers |")
        out.append("|---|---:|---:|---:|")
        ours_row, theirs_row = [], []
        for col in COLUMNS:
            a = ours.get((pipeline, width, height, batch, col))
            b = theirs.get((pipeline, width, height, batch, col))
            if a is None and b is None:
                continue
            ours_row.append(a)
            theirs_row.append(b)
            out.append(f"| {LABELS[col]} | {text(a)} | {text(b)} | {ratio(a, b)} |")
        a, b = best(ours_row), best(theirs_row)
        if a and b:
            out.append(f"| **best of each** ({a['column']} vs {b['column']}) | {text(a)} | {text(b)} | **{ratio(a, b)}** |")
        out.append("")
    markdown = "\n".join(out)
    print(markdown)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
