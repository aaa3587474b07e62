"""Models, preprocessing and configuration shared by sites and coordinator.

Importing this package keeps MONAI from importing MLflow and TensorBoard: ``import monai`` loads
``monai.handlers.mlflow_handler`` and ``monai.visualize.img2tensorboard``, which import both eagerly
whenever they are installed (about 3 s per process; issue 21 installs them for the ServerApp's
experiment tracking). Until :func:`allow_tracking_imports` is called, an ``import mlflow`` raises
ImportError, which MONAI's ``optional_import`` handles as "not installed". Only
``server.tracking`` calls it, when a run tracks.
"""

from __future__ import annotations

import sys

TRACKING_MODULES = ("mlflow", "tensorboard", "torch.utils.tensorboard")


def allow_tracking_imports() -> None:
    """Let MLflow and TensorBoard be imported in this process (undoes the block set on import)."""
    for name in TRACKING_MODULES:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


for _name in TRACKING_MODULES:
    sys.modules.setdefault(_name, None)  # an already imported module stays
