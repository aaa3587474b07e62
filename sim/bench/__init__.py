"""``onfh sim bench``: benchmarks that print measured figures as ratios against a baseline run in the same call.

* :mod:`sim.bench.core`: the section registry, :func:`~sim.bench.core.run_benchmarks`, the tables;
* :mod:`sim.bench.models`: ``detector``, ``transfer``;
* :mod:`sim.bench.data`: ``ingestion``, ``input_pipeline``, ``inference``;
* :mod:`sim.bench.federation`: ``federated``, ``scaling``, ``deployment``;
* :mod:`sim.bench.gpu`: ``gpu``; :mod:`sim.bench.gpu_check`: the GPU machine's one-shot check;
* :mod:`sim.bench.poisoning`: ``poisoning`` (issue 16).
"""
