"""`fuyou-ray report RUN_DIR`: (re)build a run's HTML report and PNG charts from its run dir."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  fuyou-ray report runs/demo                 # writes runs/demo/report/index.html (+ PNGs with matplotlib)
  fuyou-ray report runs/demo --no-png        # HTML only (its charts are inline SVG)
  fuyou-ray report runs/demo --running       # mark it as in progress (the page reloads every minute)
The driver refreshes the same report while it trains and once more at the end; this command rebuilds it
from metrics.jsonl, timeline.json, config.yaml, plan.json and summary.json, e.g. after copying a run dir.
exit codes: 0 written; 4 not a run dir."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="build a run's HTML report (loss, throughput, pipeline timeline) and PNG charts",
        description="Build RUN_DIR/report/index.html: a self-contained page (no network needed) with the "
        "loss and eval curves, throughput over time, busy %% per resource and the pipeline timeline of a "
        "recent step; plus PNG copies of the charts when matplotlib is installed "
        "(pip install 'fuyou-ray[report]').",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="the run_dir of a fuyou-ray run (holds metrics.jsonl)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG copies of the charts")
    p.add_argument("--running", action="store_true", help="mark the run as in progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.report import build_report

    files = build_report(args.run_dir, png=not args.no_png, final=not args.running)
    print(f"report: {files.html}")
    for path in files.pngs:
        print(f"chart:  {path}")
    if files.png_note and not args.no_png:
        print(files.png_note)
    return 0
