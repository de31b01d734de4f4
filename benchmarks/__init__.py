"""lightning_prune's benchmarks: one command, one report.

    python -m benchmarks run --suite quick|full [--out DIR] [--only NAME ...]
    python -m benchmarks docs [--results benchmarks/results/results.json]

``run`` calls every experiment in :data:`EXPERIMENTS` in turn and writes, into ``--out`` (default
``benchmarks/results/``): ``results.json`` (every figure, the machine, torch version, seeds, date,
git commit), ``RESULTS.md`` and the experiments' PNG plots; with the default ``--out`` it also rewrites
the documentation's Benchmarks page, ``docs/benchmarks.md`` (between the ``benchmarks:begin``/``benchmarks:end``
markers). ``docs`` rewrites that part from a committed ``results.json`` (``tests/test_benchmarks.py``
checks that the page equals it).

The experiment contract: a module under ``benchmarks/`` with

    def run(suite: Literal["quick", "full"], out_dir: pathlib.Path) -> benchmarks.report.Section

``quick`` is the CI smoke size (all experiments together under 6 minutes on 2 CPU cores), ``full``
the publication size (3 seeds, ``benchmarks.report.SEEDS``). The module writes its figures into
``out_dir`` and returns a :class:`benchmarks.report.Section`: ``title``, ``markdown`` (definitions and
tables, no heading), ``figures`` (file names relative to ``out_dir``), ``data`` (JSON-able: every number
shown), ``notes`` and ``behind`` (where lightning_prune does worse than a baseline, with the reason).
To add an experiment, write the module and add its name to :data:`EXPERIMENTS`.
"""

import pathlib
import runpy

# The benchmarks run in the test environment, where PyPI's torchvision needs its operator schemas defined
# beside a CPU build of torch before torchmetrics (and so pytorch_lightning) imports it; a no-op elsewhere.
runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "torchvision_shim" / "sitecustomize.py"))

EXPERIMENTS: list[str] = [
    "benchmarks.unstructured_quality",
    "benchmarks.step_overhead",
    "benchmarks.search_speed",
    "benchmarks.scaling",
    "benchmarks.structured_quality",
    "benchmarks.time_to_structure",
    "benchmarks.real_speedup",
    "benchmarks.transformers",
    "benchmarks.bounded_discovery",
]
