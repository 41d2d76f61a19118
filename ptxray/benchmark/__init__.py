"""`ptxray benchmark`: which architecture to train for pneumothorax, and at what cost.

- `measure`: what is compared (`parse_archs`, `ArchSpec`, `BenchmarkSettings`) and how each
  architecture is measured on the same cached data, fold and training budget
  (`benchmark_architecture`, `train_for_budget`, `measure_rate`, `count_flops`); its docstring
  defines every measurement.
- `report`: the result rows as a terminal table, CSV, JSON, PNG plots and a Markdown report
  (`write_report`, `print_table`).

`run_local` runs the architectures one after another in this process; `ptxray.ray_benchmark`
runs each as a Ray Tune trial (on a cluster, in parallel on separate GPUs). Both return the same
result rows, which `write_report` turns into its files.
"""

from __future__ import annotations

# The public names of both parts, importable from ptxray.benchmark as before it was a package.
from ptxray.benchmark import measure, report
from ptxray.benchmark.measure import *  # noqa: F403
from ptxray.benchmark.report import *  # noqa: F403

__all__ = [*measure.__all__, *report.__all__]
