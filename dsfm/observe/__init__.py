"""Watching and comparing runs: the run directory (`rundir`), metrics and their sinks, health
warnings and early stopping (`monitor`), the end-of-run summary, `dsfm runs` and `dsfm plot`."""
