"""Everything after the search: Pareto fronts and hypervolume, the results-folder report, plots and
parameter importance, picking a trial, retraining it and exporting the result."""
