"""`mmpeft sweep SWEEP.yaml`: tasks x methods x seeds x a search grid, with the two-stage protocol.

Stage 1 trains every search point on the tuning split (VTAB: train800) with the first seed and
selects the point with the best value of the sweep's `select` metric on validation (val200). Stage 2
retrains the chosen point on train+val for every seed and evaluates the test split once. The test
split never selects anything.

Any scalar metric a run logs can select and be reported (cells read it from their run's `summary.json`:
`metrics[name]`, or the legacy `val_acc` / `test_acc` keys of older summaries):

    select: {metric: val/acc, mode: max}   # the default; a diffusion sweep: {metric: val/fid, mode: min}
    report: test/acc                       # the default: the select metric with `val/` replaced by `test/`

A finished cell whose summary lacks the metric its stage needs stops the sweep at once with a one-line
error naming the metric, the cell and the metrics it has (a misspelt name should not cost a whole stage).

The whole sweep is checked before the first cell runs (`check_sweep`): every task is in the dataset
metadata (when `metadata` is set), every method config exists and parses with `mmpeft fit`'s own parser
(unknown options, unknown method names and method options included), and every dotted key in `args`,
`search` and `overrides` exists in it. All problems come in one `SweepError`, and nothing runs.

Each cell is one `mmpeft fit` in its own process (crash isolation, a fresh CUDA context), with its
log, run directory and adapter file kept. With `--parallel N` the cells are spread over the visible GPUs
(`device_slots`: one `CUDA_VISIBLE_DEVICES` id per cell, cycling over them; nothing is set without a GPU).
A cell is done when its result file exists, so a killed sweep resumes where it stopped. A cell's id
hashes what defines it: the content (not the path) of its method's config files and of any config file
they or its overrides refer to, its overrides, seed and stage. Editing the sweep file or a method config
reruns exactly the cells it changes; comments, formatting and moving a file rerun nothing (`select` and
`report` are not arguments: changing them reuses every cell). A method is one config file or a list of
them (merged in order, as `mmpeft fit -c A -c B`). Selection ties go to the earliest point in grid
order, whatever order cells finished or were resumed in.

Results: `cells.csv` (every cell, with the select and report metrics as columns named by metric) and
`results.md` (the report metric per task, mean ± std over seeds, parameters; for accuracies also group
means and both VTAB means, see `mmpeft.lab.results`). Modality-agnostic: the task and data-root keys are
configurable, and groups come from the dataset metadata when known.
"""

from mmpeft.lab.sweep.checks import check_sweep
from mmpeft.lab.sweep.launch import add_sweep_arguments, run_sweep
from mmpeft.lab.sweep.plan import plan_stage1, plan_stage2, select
from mmpeft.lab.sweep.run import device_slots
from mmpeft.lab.sweep.spec import Cell, Sweep, SweepError, SweepInterrupted, config_fingerprint, load_sweep

__all__ = [
    "Cell",
    "Sweep",
    "SweepError",
    "SweepInterrupted",
    "load_sweep",
    "check_sweep",
    "config_fingerprint",
    "device_slots",
    "plan_stage1",
    "plan_stage2",
    "select",
    "run_sweep",
    "add_sweep_arguments",
]
