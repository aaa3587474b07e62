"""Every name this project takes from a non-public Flower module, behind one version guard.

Flower's public API is ``flwr.app`` (records, ``Message``, ``Context``), ``flwr.clientapp``,
``flwr.serverapp`` (``Grid``, ``ServerApp``, ``flwr.serverapp.strategy``) and the ``flwr`` CLI. A
few things the project needs live only in Flower's internals (``flwr.supercore``,
``flwr.supernode``, ``flwr.superlink``, ``flwr.proto``, ``flwr.common.serde``, ...): the fork
launcher of :mod:`client.clientapp_forkserver` reimplements ``flower-superexec``'s loop, the audit
log measures a reply's wire size, the benchmarks count Flower's transfer objects, and tests build
messages outside a running Flower process. Flower may move any of these in a minor release.

So they are imported **only here**, by name, from :data:`INTERNALS` (name -> ``(module,
attribute)``), and only when first used (module ``__getattr__``, PEP 562: importing this module
costs no more than ``import flwr``; Ray and the SuperNode runtime load only where they are used).
Each access looks the name up in Flower's module again, so a test that monkeypatches Flower's
module is seen here too.

Guard: importing this module checks ``flwr.__version__`` against :data:`TESTED_FLOWER`, the range
these names were checked on, and raises :class:`UntestedFlowerError` naming the installed version
otherwise (``ONFH_ALLOW_UNTESTED_FLOWER=1`` turns that into a warning, to try an upgrade).
``tests/test_flower_internals.py`` imports every name and checks the signatures and attributes the
code relies on, so an upgrade that moves or changes one fails there, in one place.

Import rules: see :mod:`shared_models.flower` (any layer may import this module; it imports only
Flower).
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from typing import TYPE_CHECKING, Any

import flwr

__all__ = [
    "INTERNALS",
    "TESTED_FLOWER",
    "UntestedFlowerError",
    "check_flower_version",
    *sorted(
        [
            "AcquireTaskRequest",
            "AcquireTaskResponse",
            "AutoExecPlugin",
            "ExecutionSpec",
            "Executor",
            "InMemoryGrid",
            "LaunchResult",
            "RuntimeHttpClient",
            "RuntimeVersionHttpInterceptor",
            "SUPERNODE_UVICORN_DEFAULT_PORT",
            "TaskIdentity",
            "TaskType",
            "aggregate_arrayrecords",
            "get_all_nested_objects",
            "make_message",
            "parse_config_args",
            "pool_size_from_resources",
            "recorddict_to_proto",
            "run_clientapp",
            "run_simulation_settings",
            "simulation_config_from_json",
            "validate_and_resolve_root_certificates",
        ]
    ),
]

#: ``(lowest, first excluded)`` ``(major, minor)`` of Flower these internals were checked on.
TESTED_FLOWER: tuple[tuple[int, int], tuple[int, int]] = ((1, 42), (1, 43))
#: Set to ``1`` to import anyway (with a warning) on an untested Flower.
ALLOW_ENV = "ONFH_ALLOW_UNTESTED_FLOWER"

#: Name here -> (Flower module, attribute there). Who uses it, in the comment.
INTERNALS: dict[str, tuple[str, str]] = {
    # client.clientapp_forkserver: the SuperExec loop and Flower's per-task ClientApp runner
    "TaskType": ("flwr.supercore.constant", "TaskType"),
    "SUPERNODE_UVICORN_DEFAULT_PORT": ("flwr.supercore.constant", "SUPERNODE_UVICORN_DEFAULT_PORT"),
    "Executor": ("flwr.supercore.superexec.executor", "Executor"),  # the protocol ForkExecutor implements
    "ExecutionSpec": ("flwr.supercore.superexec.executor", "ExecutionSpec"),
    "LaunchResult": ("flwr.supercore.superexec.executor", "LaunchResult"),
    "AutoExecPlugin": ("flwr.supercore.superexec.plugin", "AutoExecPlugin"),
    "RuntimeHttpClient": ("flwr.supercore.runtime", "RuntimeHttpClient"),
    "RuntimeVersionHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    "AcquireTaskRequest": ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    "AcquireTaskResponse": ("flwr.proto.runtime_pb2", "AcquireTaskResponse"),
    "validate_and_resolve_root_certificates": ("flwr.supercore.tls", "validate_and_resolve_root_certificates"),
    "run_clientapp": ("flwr.supernode.runtime.run_clientapp", "run_clientapp"),
    # client.audit: a reply's size on the wire
    "recorddict_to_proto": ("flwr.common.serde", "recorddict_to_proto"),
    # sim.bench.models: Flower's content-addressed transfer objects of a record
    "get_all_nested_objects": ("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
    # sim.bench.poisoning, tests: the running task's identity that new Messages are stamped with
    "TaskIdentity": ("flwr.supercore.task_identity", "TaskIdentity"),
    # tests: replies as a SuperNode would return them, Flower's own aggregation and in-memory Grid
    "make_message": ("flwr.app.message.message", "make_message"),
    "aggregate_arrayrecords": ("flwr.serverapp.strategy.strategy_utils", "aggregate_arrayrecords"),
    "InMemoryGrid": ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid"),
    # tests: how `flwr run --federation-config` is read and how many Ray actors it gives
    "parse_config_args": ("flwr.common.config", "parse_config_args"),
    "simulation_config_from_json": ("flwr.supercore.utils", "simulation_config_from_json"),
    "run_simulation_settings": ("flwr.simulation.app", "_run_simulation_settings"),
    "pool_size_from_resources": ("flwr.simulation.ray_transport.ray_actor", "pool_size_from_resources"),
}


class UntestedFlowerError(ImportError):
    """The installed Flower is outside :data:`TESTED_FLOWER`; its internals may have moved."""


def check_flower_version(version: str, *, allow: bool = False) -> None:
    """Check a Flower version string against :data:`TESTED_FLOWER`.

    Args:
        version: e.g. ``"1.42.0"`` (``flwr.__version__``).
        allow: warn instead of raising (``ONFH_ALLOW_UNTESTED_FLOWER=1``).

    Raises:
        UntestedFlowerError: the version is outside the tested range or unreadable (unless ``allow``).
    """
    (lo, hi), found = TESTED_FLOWER, re.match(r"(\d+)\.(\d+)", version)
    if found and lo <= (int(found[1]), int(found[2])) < hi:
        return
    message = (
        f"Flower {version} is installed, but ONFH-FL's use of Flower internals (shared_models/flower/internals.py) "
        f"is tested on flwr>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}; install flwr=={lo[0]}.{lo[1]}.* "
        f"(pyproject.toml), or set {ALLOW_ENV}=1 to try this version and run tests/test_flower_internals.py"
    )
    if not allow:
        raise UntestedFlowerError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


check_flower_version(flwr.__version__, allow=os.environ.get(ALLOW_ENV) == "1")


def __getattr__(name: str) -> Any:
    """The Flower object behind ``name`` (:data:`INTERNALS`), imported on first use."""
    try:
        module, attribute = INTERNALS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted({*globals(), *INTERNALS})


if TYPE_CHECKING:  # the same names for type checkers and editors
    from flwr.app.message.message import make_message  # noqa: F401
    from flwr.common.config import parse_config_args  # noqa: F401
    from flwr.common.serde import recorddict_to_proto  # noqa: F401
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse  # noqa: F401
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: F401
    from flwr.simulation.app import _run_simulation_settings as run_simulation_settings  # noqa: F401
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources  # noqa: F401
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, TaskType  # noqa: F401
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: F401
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor  # noqa: F401
    from flwr.supercore.runtime import RuntimeHttpClient  # noqa: F401
    from flwr.supercore.superexec.executor import ExecutionSpec, Executor, LaunchResult  # noqa: F401
    from flwr.supercore.superexec.plugin import AutoExecPlugin  # noqa: F401
    from flwr.supercore.task_identity import TaskIdentity  # noqa: F401
    from flwr.supercore.tls import validate_and_resolve_root_certificates  # noqa: F401
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # noqa: F401
    from flwr.supernode.runtime.run_clientapp import run_clientapp  # noqa: F401
