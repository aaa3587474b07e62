"""What the site and the coordinator both say to Flower: the one Flower adapter room of the project.

Modules:

* :mod:`shared_models.flower.records`: a state dict <-> Flower ``ArrayRecord`` (packed for transfer,
  :mod:`shared_models.transfer`); the ClientApp, the ServerApp and the calibration round use it.
* :mod:`shared_models.flower.env`: the environment of every Flower process this project starts
  (``FLOWER-1.42-NOTES.md``: project-local ``FLWR_HOME``, no phone-home, **no runtime dependency
  installation**), and where Flower's console scripts are; used by the simulation runner, the
  coordinator and the site daemon.
* :mod:`shared_models.flower.internals`: every name this project takes from a **non-public** Flower
  module (``flwr.supercore``, ``flwr.supernode``, ``flwr.proto``, ...), behind one version guard.

Import rules (``docs/ARCHITECTURE.md``):

1. ``client``, ``server``, ``strategies``, ``sim`` and ``tests`` may import this package;
   it imports none of them (only ``shared_models`` modules and Flower).
2. Within ``shared_models``, only this package imports Flower; every other ``shared_models``
   module stays Flower-free, and the torch-free specs import neither torch nor Flower.
3. Public Flower API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, ``flwr.simulation``'s
   documented entry points) may be imported anywhere above ``shared_models``. A name from any other
   Flower module is imported from :mod:`shared_models.flower.internals` only, so that a Flower
   upgrade that moves it fails in one place (``tests/test_flower_internals.py``).
4. :mod:`shared_models.flower.env` imports neither torch nor Flower, so a site command that only
   starts Flower processes stays light.

Nothing is imported here: importing :mod:`shared_models.flower.env` must not pull in torch.
"""
