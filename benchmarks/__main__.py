"""``python -m benchmarks run --suite quick|full`` and ``python -m benchmarks docs`` (see ``benchmarks/__init__.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import pathlib
import sys
import time
import warnings

from benchmarks import EXPERIMENTS
from benchmarks.report import (
    RESULTS_DIR,
    SEEDS,
    SUITES,
    load_results,
    machine,
    render_docs,
    render_results,
    replace_marked_section,
)

DOCS_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_docs(results_json: pathlib.Path) -> None:
    DOCS_PAGE.write_text(replace_marked_section(DOCS_PAGE.read_text(), render_docs(load_results(results_json))))


def run(suite: str, out_dir: pathlib.Path, only: list[str]) -> pathlib.Path:
    short = {name: name.rsplit(".", 1)[-1] for name in EXPERIMENTS}
    unknown = sorted(set(only) - set(short.values()))
    if unknown:
        raise ValueError(f"`--only` must name experiments of {list(short.values())}, got {unknown}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"suite": suite, "seeds": SEEDS[suite], "machine": machine(), "sections": [], "seconds": 0.0}
    start = time.perf_counter()
    for name in EXPERIMENTS:
        if only and short[name] not in only:
            continue
        began = time.perf_counter()
        print(f"[benchmarks] {name} ({suite}) ...", flush=True)
        section = importlib.import_module(name).run(suite, out_dir)
        section.notes.append(f"Wall time of this experiment: {time.perf_counter() - began:.0f} s.")
        results["sections"].append(dataclasses.asdict(section))
        print(f"[benchmarks] {name}: {time.perf_counter() - began:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - start
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "RESULTS.md").write_text(render_results(results))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the experiments, write results.json, RESULTS.md and plots")
    run_parser.add_argument("--suite", choices=SUITES, default="quick")
    run_parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR,
                            help="output directory (default benchmarks/results/; only then is docs/benchmarks.md rewritten)")
    run_parser.add_argument("--only", nargs="+", default=[], help="run only these experiments (module names)")
    docs_parser = commands.add_parser("docs", help="rewrite docs/benchmarks.md's generated part from results.json")
    docs_parser.add_argument("--results", type=pathlib.Path, default=RESULTS_DIR / "results.json")
    args = parser.parse_args(argv)
    if args.command == "docs":
        write_docs(args.results)
        return
    import pytorch_lightning  # noqa: F401 - it sets its loggers' levels on import; ours come after

    quiet = [logging.getLogger(name) for name in
             ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric", "lightning_prune")]
    levels = [logger.level for logger in quiet]
    try:  # quiet for this run only: main() also runs inside a test session
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = run(args.suite, args.out, args.only)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    if args.out.resolve() == RESULTS_DIR.resolve() and not args.only:
        write_docs(path)
    print(f"[benchmarks] wrote {path.parent}", file=sys.stderr)


if __name__ == "__main__":
    main()
