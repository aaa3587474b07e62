"""ClientApp handlers: site resolution and failure containment (no patient-level text reaches the server)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import SiteStepError, _contained, resolve_site
from shared_models.config import RunConfig
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.usefixtures("task_identity")


def _context(tmp_path, node_config):
    rc = tiny_run_config(**{"data-root": str(tmp_path), "cache-dir": str(tmp_path / "cache")})
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=rc)


def test_resolve_site_in_simulation_and_deployment(tmp_path):
    cfg = RunConfig.from_run_config(tiny_run_config(**{"data-root": str(tmp_path)}))
    sim = _context(tmp_path, {"partition-id": 2, "num-partitions": 4})
    assert resolve_site(sim, cfg) == ("C", tmp_path / "C")
    dep = _context(tmp_path, {"site-id": "H7", "data-path": "/srv/onfh"})
    assert resolve_site(dep, cfg)[0] == "H7"
    with pytest.raises(ValueError, match="node config"):
        resolve_site(_context(tmp_path, {}), cfg)


def test_failure_reaches_server_without_details_and_is_logged_at_site(tmp_path):
    secret = "/data/hospital/Doe^Jane/study-1 is unreadable"

    @_contained
    def handler(msg, context):
        raise ValueError(secret)

    msg = Message(
        content=RecordDict({"config": ConfigRecord({"phase": "stager"})}), dst_node_id=5, message_type="train"
    )
    with pytest.raises(SiteStepError) as info:
        handler(msg, _context(tmp_path, {"partition-id": 0, "num-partitions": 4}))
    assert "Doe" not in str(info.value) and "/data" not in str(info.value)
    assert "train/stager" in str(info.value) and "ValueError" in str(info.value)
    log = (tmp_path / "cache" / "A" / "site-errors.log").read_text()
    assert secret in log


@pytest.mark.parametrize("phase", ["detector", "stager"])
def test_fedbn_keeps_the_sites_own_norm_layers(tmp_path, phase):
    import torch
    from flwr.app import ArrayRecord

    from client.client_app import _keep_local_norms, _receive_state
    from shared_models.detection import YOLOX3D
    from shared_models.stager import MulDenseNet3D

    cfg = RunConfig.from_run_config(tiny_run_config(strategy="fedbn"))
    context = _context(tmp_path, {"partition-id": 0, "num-partitions": 4})
    model = YOLOX3D(cfg.detector) if phase == "detector" else MulDenseNet3D(cfg.stager)
    global_state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    local_state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    msg = Message(content=RecordDict({"arrays": ArrayRecord(global_state)}), dst_node_id=5, message_type="train")

    first, norm_keys = _receive_state(msg, context, cfg, phase)  # nothing kept yet: all global
    assert all(torch.count_nonzero(v) == 0 for v in first.values())
    norm_layers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)}
    assert norm_keys and all(k.rsplit(".", 1)[0] in norm_layers for k in norm_keys)
    # every norm layer's running statistics and affine parameters stay local
    assert {k.rsplit(".", 1)[0] for k in norm_keys} == norm_layers

    _keep_local_norms(context, local_state, norm_keys, phase, cfg)
    state, _ = _receive_state(msg, context, cfg, phase)
    for key, value in state.items():
        expected = 1 if key in norm_keys else 0
        assert torch.all(value == expected), key


def test_deployed_site_ignores_the_run_configs_cache_dir(tmp_path):
    """In deployment the cache (and so the error log) is site-local: node config ``cache-dir`` or
    ``<data-path>/.onfh-cache``, never the run config's; simulation keeps the run config's."""
    from client.client_app import site_cache_dir

    cfg = RunConfig.from_run_config(
        tiny_run_config(**{"data-root": str(tmp_path), "cache-dir": str(tmp_path / "cache")})
    )
    dep = _context(tmp_path, {"site-id": "H7", "data-path": str(tmp_path / "H7")})
    assert site_cache_dir(dep, cfg) == tmp_path / "H7" / ".onfh-cache"
    own = _context(tmp_path, {"site-id": "H7", "data-path": str(tmp_path / "H7"), "cache-dir": str(tmp_path / "own")})
    assert site_cache_dir(own, cfg) == tmp_path / "own"
    assert site_cache_dir(_context(tmp_path, {"partition-id": 1, "num-partitions": 4}), cfg) == tmp_path / "cache" / "B"

    @_contained
    def handler(msg, context):
        raise ValueError("boom")

    msg = Message(
        content=RecordDict({"config": ConfigRecord({"phase": "stager"})}), dst_node_id=5, message_type="train"
    )
    with pytest.raises(SiteStepError):
        handler(msg, dep)
    assert "boom" in (tmp_path / "H7" / ".onfh-cache" / "site-errors.log").read_text()
    assert not (tmp_path / "cache").exists()
