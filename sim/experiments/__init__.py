"""Experiments on phantoms and public data: the Flower simulation and its report, grids of variants x seeds.

* :mod:`sim.experiments.runner`: a Flower simulation run (SuperLink, ``flwr run``, status polls, stop);
* :mod:`sim.experiments.experiment`: splits -> simulation -> report (``onfh sim run``);
* :mod:`sim.experiments.compare`: a grid of variants x seeds (``onfh sim compare``);
* :mod:`sim.experiments.pooled`, :mod:`sim.experiments.baseline`: the pooled and intensity baselines;
* :mod:`sim.experiments.exact_check`: exact confidence intervals on the test heads;
* :mod:`sim.experiments.real_check`: ``onfh infer`` on the real pelvic MRI against hand-placed marks;
* :mod:`sim.experiments.medmnist`, :mod:`sim.experiments.medmnist_app`: the AdrenalMNIST3D benchmark
  (:mod:`sim.experiments.medmnist_runs`: its run names, torch-free for the ``onfh sim`` parser).
"""
