"""The lab: experiment tooling above the library (bench, sweeps, plots, result tables, the quickstart transfer
tables, the training command line). Nothing below imports it; it never imports `mmpeft.cli`."""
