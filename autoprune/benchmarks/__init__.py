"""Re-runnable benchmarks behind the README's "Performance" numbers.

Each module runs as ``python -m autoprune.benchmarks.<name>`` (``--quick`` for a CI-sized run),
prints its table and writes ``results/benchmarks/<name>.md`` and ``.csv``:

- ``engine_speed``: seconds for grouping, scoring, allocation and surgery on real architectures;
- ``latency``: measured latency of pruned vs base models next to their MACs ratio;
- ``latency_search``: the latency model's error, latency-targeted vs MACs-targeted models, and a search
  for accuracy vs latency against one for accuracy vs MACs;
- ``quality``: autoprune's methods against Torch-Pruning's own pruners at equal MACs and budget;
- ``search``: hypervolume of the search vs random sampling vs single methods, and what early
  stopping saves;
- ``gpu``: the CUDA paths on one GPU (trial throughput, pruned speed-up, every method on the
  device, workers sharing a GPU, the latency model); ``--dry-run`` runs it on the CPU. Not yet
  run on a GPU.
"""
