#!/usr/bin/env python
"""Draw a run's curves (loss, lr, kNN top-1, top-1) from its metrics.jsonl into one PNG.

    python plot_run.py runs/moco                 # -> runs/moco/curves.png
    python plot_run.py runs/lincls -o probe.png

Needs matplotlib (pip install matplotlib, or -r requirements-extra.txt).
"""
import argparse
import os

from common.cli import ArgumentParser
from common.errors import report_user_errors
from common.log.plots import plot_curves, read_metrics


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Plot a run's metrics.jsonl")
    p.add_argument("run_dir", help="the --output-dir of a main_moco.py, main_simclr.py or main_lincls.py run")
    p.add_argument("-o", "--output", default="", help="PNG to write (default: RUN_DIR/curves.png)")
    return p


@report_user_errors
def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    records = read_metrics(args.run_dir)
    out = plot_curves(records, args.output or os.path.join(args.run_dir, "curves.png"),
                      title=os.path.basename(os.path.abspath(args.run_dir)))
    print(f"=> {out}: {len(records)} epoch(s)")


if __name__ == "__main__":
    main()
