"""Models, preprocessing and configuration shared by sites and coordinator.

Importing this package keeps MONAI's own modules from importing MLflow and TensorBoard: ``import
monai`` loads ``monai.handlers.mlflow_handler`` and ``monai.visualize.img2tensorboard``, whose
``optional_import`` imports both eagerly whenever they are installed (about 3 s per process; issue
21 installs them for the ServerApp's experiment tracking). The refusal applies only to imports made
from a ``monai`` module, which MONAI handles as "not installed"; every other import of MLflow or
TensorBoard (``server.tracking``, user code) works as usual, since a refused import caches nothing.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from types import FrameType

TRACKING_MODULES = ("mlflow", "tensorboard", "torch.utils.tensorboard")


def _imported_from_monai() -> bool:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("monai."):
            return True
        frame = frame.f_back
    return False


class _DeclineTrackersForMonai(MetaPathFinder):
    """Refuses MLflow and TensorBoard to MONAI's optional imports only (see the module docstring)."""

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == m or fullname.startswith(m + ".") for m in TRACKING_MODULES) and _imported_from_monai():
            raise ModuleNotFoundError(f"{fullname} is not offered to MONAI's optional imports", name=fullname)
        return None


if not any(isinstance(f, _DeclineTrackersForMonai) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeclineTrackersForMonai())
