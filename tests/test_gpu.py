"""GPU use (issue 19): the simulation's GPU share, the preflight's GPU report, the fork launcher's CUDA
hygiene. The CPU tests fake a GPU where they need one; the ``gpu`` tests run only where CUDA is present
(``scripts/gpu_check.sh`` runs them with the GPU benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from sim.experiments import runner

REPO = runner.APP_DIR


def _fake_gpu(monkeypatch, memory_gib: float = 80.0, major: int = 9, name: str = "NVIDIA Fake"):
    props = SimpleNamespace(
        name=name, total_memory=int(memory_gib * 2**30), major=major, minor=0, multi_processor_count=132
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- simulation


def test_without_cuda_the_simulation_asks_for_no_gpu(monkeypatch, caplog):
    _no_gpu(monkeypatch)
    assert runner.gpus_per_site() == 0.0
    assert runner.gpus_per_site(0.5) == 0.0  # would leave Ray without a single ClientApp slot
    assert "ignored" in caplog.text
    assert runner.federation_config(4, 1, 0.0) == "num-supernodes=4 client-resources-num-cpus=1"


@pytest.mark.parametrize("memory_gib, expected", [(80.0, 0.25), (141.0, 0.25), (16.0, 0.5), (24.0, 1 / 3), (4.0, 1.0)])
def test_with_cuda_each_site_gets_a_share_that_fits_the_memory(monkeypatch, memory_gib, expected):
    _fake_gpu(monkeypatch, memory_gib)
    # the share is max(0.25, 8 GiB / memory), at most the whole GPU
    assert runner.gpus_per_site() == pytest.approx(expected, abs=1e-3)
    assert runner.gpus_per_site(0.5) == 0.5
    with pytest.raises(ValueError, match="gpus-per-site"):
        runner.gpus_per_site(1.5)


def _flower_pool_size(federation: str, monkeypatch, cpus: int, gpus: int) -> tuple[dict, int]:
    """Flower's own reading of a ``--federation-config`` value and the actor count its Ray backend takes
    from it on one node with ``cpus`` CPUs and ``gpus`` GPUs."""
    import ray

    from shared_models.flower import internals as fi

    parsed = {k.replace("-", "_"): v for k, v in fi.parse_config_args([federation]).items()}  # as `flwr run` does
    _, _, backend_config, _, _ = fi.run_simulation_settings(fi.simulation_config_from_json(parsed))
    resources = backend_config["client_resources"]
    monkeypatch.setattr(ray, "nodes", lambda: [{"Resources": {"CPU": cpus, "GPU": gpus}}])  # Flower asks Ray
    return resources, fi.pool_size_from_resources(resources)


def test_flower_runs_one_site_per_share_of_the_gpu(monkeypatch):
    _fake_gpu(monkeypatch, 80.0)
    text = runner.federation_config(4, 1, runner.gpus_per_site())
    resources, actors = _flower_pool_size(text, monkeypatch, cpus=16, gpus=1)
    assert resources == {"num_cpus": 1, "num_gpus": pytest.approx(0.25)}
    assert actors == 4  # min(16 CPUs / 1, 1 GPU / 0.25)
    resources, actors = _flower_pool_size(runner.federation_config(4, 1, 0.5), monkeypatch, cpus=16, gpus=2)
    assert actors == 4  # min(16, 2 / 0.5)
    _no_gpu(monkeypatch)
    resources, actors = _flower_pool_size(
        runner.federation_config(4, 1, runner.gpus_per_site()), monkeypatch, cpus=16, gpus=1
    )
    assert "num_gpus" not in resources and actors == 16  # CPU runs unchanged: one ClientApp per core


@pytest.mark.parametrize("gpu", [True, False])
def test_run_simulation_hands_flower_the_gpu_share(monkeypatch, tmp_path, gpu):
    (_fake_gpu if gpu else _no_gpu)(monkeypatch)
    seen = {}

    @contextmanager
    def no_superlink(work, env):
        yield "127.0.0.1:1", 0

    def fake_flwr(args, env, timeout=300):
        seen["args"] = args
        raise runner.SimulationError("stop here")

    monkeypatch.setattr(runner, "simulation_superlink", no_superlink)
    monkeypatch.setattr(runner, "_flwr", fake_flwr)
    with pytest.raises(runner.SimulationError, match="stop here"):
        runner.run_simulation({}, num_sites=3, work_dir=tmp_path, cpus_per_client=2)
    federation = seen["args"][seen["args"].index("--federation-config") + 1]
    expected = "num-supernodes=3 client-resources-num-cpus=2"
    assert federation == (expected + " client-resources-num-gpus=0.25" if gpu else expected)


def test_cli_takes_gpus_per_site_on_run_and_demo():
    from shared_models.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sim", "run", "--data", "d", "--out", "o", "--gpus-per-site", "0.5"])
    assert args.gpus_per_site == 0.5
    assert parser.parse_args(["sim", "demo", "--out", "o"]).gpus_per_site is None


# --------------------------------------------------------------------------- deployment preflight


def test_preflight_reports_the_gpu(monkeypatch):
    from client import gpu, site_daemon

    _fake_gpu(monkeypatch, 139.8, name="NVIDIA H200")
    monkeypatch.setattr(gpu, "nvidia_driver_version", lambda: "580.159.04")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    check = site_daemon.check_device()
    assert check.ok
    for part in (
        "NVIDIA H200",
        "139.8 GiB",
        "sm 9.0",
        "driver 580.159.04",
        "CUDA 13.0",
        f"torch {torch.__version__}",
        "bf16 yes",
    ):
        assert part in check.detail
    _fake_gpu(monkeypatch, 16.0, major=7, name="Tesla V100")  # Volta: no native bfloat16
    assert "bf16 no" in site_daemon.check_device().detail


def test_preflight_says_when_there_is_no_cuda_device(monkeypatch):
    from client import site_daemon

    _no_gpu(monkeypatch)
    check = site_daemon.check_device()
    assert check.ok and check.detail.startswith("no CUDA device") and "CPU only" in check.detail


# --------------------------------------------------------------------------- fork launcher

#: In a fresh interpreter: record every torch.cuda query, warm up as the fork launcher does, report.
_WARM_SPY = textwrap.dedent("""
    import json, os, sys
    import torch
    calls = []
    for name in ("is_available", "device_count", "get_device_properties", "current_device", "_lazy_init", "init",
                 "is_bf16_supported", "get_device_name", "get_device_capability", "set_device", "synchronize",
                 "mem_get_info", "memory_allocated"):
        original = getattr(torch.cuda, name)
        def spy(*a, _name=name, _original=original, **k):
            calls.append([_name, os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")])
            return _original(*a, **k)
        setattr(torch.cuda, name, spy)
    from client.clientapp_forkserver import assert_cuda_untouched, warm_imports
    warm_imports(sys.argv[1])
    result = {"initialized": torch.cuda.is_initialized(), "calls": calls,
              "nvml_check": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")}
    torch.cuda.is_initialized = lambda: True  # what the guard must catch
    try:
        assert_cuda_untouched()
        result["guard"] = "silent"
    except RuntimeError as err:
        result["guard"] = str(err)
    print(json.dumps(result))
""")


def _warm_module() -> str:
    """The ClientApp module where Flower is installed, else the training modules it imports (the GPU machine
    of ``scripts/gpu_check.sh`` has no Flower)."""
    try:
        import flwr  # noqa: F401

        return "client.client_app"
    except ImportError:
        return "client.stager_training"


def test_fork_launcher_warm_up_leaves_cuda_uninitialised():
    proc = subprocess.run(
        [sys.executable, "-c", _WARM_SPY, _warm_module()], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["initialized"] is False
    assert result["nvml_check"] == "1"
    # nothing but a fork-safe availability check (NVML) may ask about CUDA while warming up
    assert all(name == "is_available" and nvml == "1" for name, nvml in result["calls"]), result["calls"]
    assert "forked ClientApp" in result["guard"]


#: In a fresh interpreter: warm up, fork, train the stager on CUDA in the child; the parent never touches CUDA.
_FORK_TRAIN = textwrap.dedent("""
    import json, os, sys
    import torch
    from client.clientapp_forkserver import warm_imports
    warm_imports(sys.argv[1])
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import numpy as np
            from client.stager_training import train_stager
            from shared_models.stager import MulDenseNet3D, StagerConfig
            model = MulDenseNet3D(StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2)))
            rng = np.random.default_rng(0)
            crops = rng.random((8, 1, 32, 32, 32), dtype=np.float32)
            out = train_stager(model, crops, np.arange(8) % 3, steps=3, batch_size=4, lr=1e-3, weight_decay=0.0,
                               focal_gamma=2.0, device=torch.device("cuda"), seed=0)
            on_cuda = next(model.parameters()).is_cuda
            code = 0 if on_cuda and np.isfinite(out["train-loss"]) and torch.cuda.is_initialized() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child_exit": os.waitstatus_to_exitcode(status), "parent_initialized": torch.cuda.is_initialized()}))
""")


@pytest.mark.gpu
def test_a_forked_clientapp_trains_on_cuda():
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_TRAIN, _warm_module()], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"child_exit": 0, "parent_initialized": False}, proc.stderr[-3000:]


# --------------------------------------------------------------------------- training loops on the device


def _tiny_stager():
    from shared_models.stager import MulDenseNet3D, StagerConfig

    torch.manual_seed(0)
    return MulDenseNet3D(StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2)))


def test_batched_flips_are_monais_per_sample_flips():
    from monai.transforms import Flip

    from client.stager_training import _augment

    x = torch.rand(6, 1, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7)
    got = _augment(x.clone(), gen, (2, 3, 4), intensity=False)
    replay = torch.Generator().manual_seed(7)  # the same draws, applied one sample at a time with MONAI
    expected = x.clone()
    for dim in (2, 3, 4):
        for i in (torch.rand(len(x), generator=replay) < 0.5).nonzero().flatten().tolist():
            expected[i] = torch.as_tensor(Flip(spatial_axis=dim - 2)(expected[i]))
    assert torch.equal(got, expected) and not torch.equal(got, x)


def test_local_steps_return_device_losses_read_once(monkeypatch):
    from client import training

    run = training.LocalRun.start(
        torch.nn.Linear(3, 1), lr=1e-2, weight_decay=0.0, device=torch.device("cpu"), amp=False, proximal_mu=0.0, seed=0
    )
    x = torch.ones(2, 3)
    losses = [run.step(run.model(x).pow(2).mean()) for _ in range(3)]
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in losses)
    assert training.mean_loss(losses) == pytest.approx(sum(float(v) for v in losses) / 3)
    assert training.mean_loss([]) == 0.0


@pytest.mark.parametrize("model", ["stager", "detector"])
def test_channels_last_is_a_layout_choice_not_a_different_result(model):
    import numpy as np

    from client.detector_training import train_detector
    from client.stager_training import train_stager
    from shared_models.detection import YOLOX3D
    from shared_models.specs import DetectorConfig

    rng = np.random.default_rng(0)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        if model == "stager":
            net = _tiny_stager()
            out = train_stager(
                net,
                rng.random((8, 1, 32, 32, 32), dtype=np.float32),
                np.arange(8) % 3,
                steps=2,
                batch_size=4,
                lr=1e-3,
                weight_decay=0.0,
                focal_gamma=2.0,
                device=torch.device("cpu"),
                seed=3,
                channels_last=channels_last,
            )
        else:
            net = YOLOX3D(DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8))
            boxes = np.tile(np.array([[16, 16, 16, 8, 10, 8]], np.float32), (4, 1))
            out = train_detector(
                net,
                rng.random((4, 1, 32, 32, 32), dtype=np.float32),
                boxes,
                steps=2,
                batch_size=2,
                lr=1e-3,
                weight_decay=0.0,
                device=torch.device("cpu"),
                seed=5,
                channels_last=channels_last,
            )
        rng = np.random.default_rng(0)
        assert all(v.is_contiguous() for v in net.state_dict().values())  # weights travel in the plain layout
        results.append(out["train-loss"])
    # the same arithmetic in another memory order: equal up to float32 summation order
    assert results[1] == pytest.approx(results[0], rel=1e-4)


def _sync_warnings_per_step(train, steps_a: int = 2, steps_b: int = 6) -> float:
    """Host synchronisations a training step adds, counted by CUDA's sync debug mode (a warning for each
    ``.item()``, ``nonzero``, pageable copy, ...): the difference between two runs of different length."""
    import warnings

    counts = []
    for steps in (steps_a, steps_b):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return (counts[1] - counts[0]) / (steps_b - steps_a)


@pytest.mark.gpu
def test_stager_steps_do_not_wait_for_the_gpu():
    import numpy as np

    from client.stager_training import train_stager

    crops = np.random.default_rng(0).random((16, 1, 32, 32, 32), dtype=np.float32)
    cuda = torch.device("cuda")

    def train(steps):
        train_stager(
            _tiny_stager(),
            crops,
            np.arange(16) % 3,
            steps=steps,
            batch_size=4,
            lr=1e-3,
            weight_decay=0.0,
            focal_gamma=2.0,
            device=cuda,
            seed=0,
            flip_dims=(2, 3, 4),
        )

    train(1)  # warm-up: cuDNN, allocator
    assert _sync_warnings_per_step(train) == 0


@pytest.mark.gpu
def test_detector_augmentation_runs_on_the_gpu_and_matches_the_cpu():
    from client.augmentation import augment_detector_batch

    x = torch.rand(4, 1, 16, 24, 16, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[8.0, 12.0, 8.0, 6.0, 8.0, 6.0]] * 4)
    cpu_x, cpu_b = augment_detector_batch(x, boxes, torch.Generator().manual_seed(3), intensity=False)
    gpu_x, gpu_b = augment_detector_batch(x.cuda(), boxes, torch.Generator().manual_seed(3), intensity=False)
    assert gpu_x.is_cuda and torch.allclose(gpu_x.cpu(), cpu_x, atol=1e-5) and torch.equal(gpu_b, cpu_b)
    # noise drawn on the GPU from the seed: the same seed gives the same batch, another seed another
    a, _ = augment_detector_batch(x.cuda(), boxes, torch.Generator().manual_seed(4))
    b, _ = augment_detector_batch(x.cuda(), boxes, torch.Generator().manual_seed(4))
    c, _ = augment_detector_batch(x.cuda(), boxes, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- Grad-CAM without a deep copy


def _cam_on_a_deep_copy(model, crop, method):
    """The map as computed before issue 19: MONAI's CAM on a deep copy of the model."""
    import copy

    from monai.visualize import GradCAM, GradCAMpp

    from shared_models.gradcam import minmax_normalize

    work = copy.deepcopy(model)
    cam = (GradCAM if method == "gradcam" else GradCAMpp)(
        nn_module=work, target_layers=model.gradcam_layer, postprocessing=minmax_normalize
    )
    return cam(x=crop.clone().requires_grad_(True))[0, 0].detach().numpy()


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_gradcam_lends_the_model_and_gives_the_deep_copys_map(method):
    import numpy as np

    from shared_models.gradcam import stage_gradcam

    model = _tiny_stager().train()
    crop = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    grads = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    layer = dict(model.named_modules())[model.gradcam_layer]
    got = stage_gradcam(model, crop, method=method)
    np.testing.assert_allclose(got, _cam_on_a_deep_copy(model, crop, method), atol=1e-6)
    assert model.training and not frozen.requires_grad
    assert all(p.requires_grad for p in list(model.parameters())[1:])
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # the caller's gradients untouched
    assert not layer._forward_hooks and not layer._backward_hooks


@pytest.mark.gpu
def test_gradcam_on_the_gpu_matches_the_cpu():
    import numpy as np

    from shared_models.gradcam import stage_gradcam

    model = _tiny_stager().eval()
    crop = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    on_cpu = stage_gradcam(model, crop)
    on_gpu = stage_gradcam(model.cuda(), crop)
    assert next(model.parameters()).is_cuda
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)


# --------------------------------------------------------------------------- onfh sim bench --only gpu


def test_flop_count_of_a_convolution_is_the_textbook_count():
    from sim.bench.gpu import flops_per_sample

    conv = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 2, 1))
    voxels = 8**3
    forward = 2 * (1 * 4 * 27 + 4 * 2 * 1) * voxels  # multiply-adds of both convolutions, per output voxel
    # backward: weight gradients of both, input gradient of the second only (the input needs none)
    backward = 2 * (1 * 4 * 27 + 4 * 2) * voxels + 2 * 4 * 2 * voxels
    assert flops_per_sample(conv, (8, 8, 8), torch.device("cpu")) == forward + backward


def test_gpu_bench_runs_on_cpu_at_tiny_size_and_prints_ratios(tmp_path, capsys):
    from shared_models.cli import main
    from tests.conftest import TINY

    tiny = json.dumps(TINY)
    # an earlier test may have run a ClientApp handler in this process, which turns deterministic algorithms on
    # for the process (shared_models/determinism.py); start from off to see that the bench restores it
    torch.use_deterministic_algorithms(False)
    assert (
        main(
            [
                "sim",
                "bench",
                "--only",
                "gpu",
                "--out",
                str(tmp_path),
                "--option",
                f"gpu.config_overrides={tiny}",
                "--option",
                "gpu.device=cpu",
                "--option",
                "gpu.infer_repeats=1",
                "--option",
                "gpu.steps=1",
                "--option",
                "gpu.warmup_steps=0",
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench.json").read_text())["sections"]["gpu"]
    assert [(r["model"], r.get("batch_size")) for r in rows] == [("stager", 4), ("detector", 2), ("study", None)]
    for row in rows[:2]:
        assert row["device"] == "cpu" and row["peak_mem_gib"] is None and row["host_syncs_per_step"] is None
        assert row["ours_vs_plain"] == pytest.approx(row["ours_samples_per_s"] / row["plain_samples_per_s"])
        assert row["ours_vs_plain"] > 0 and row["gflop_per_sample"] > 0
        assert row["ours_tflops"] == pytest.approx(row["gflop_per_sample"] * row["ours_samples_per_s"] / 1e3)
    assert rows[2]["gradcam_ms_per_study"] > 0 and rows[2]["gradcam_speedup"] > 0
    assert all(r["deterministic"] for r in rows[:2]) and not torch.are_deterministic_algorithms_enabled()  # restored
    out = capsys.readouterr().out
    assert "ours vs plain" in out and "gradcam speedup" in out


# --------------------------------------------------------------------------- the prepared GPU check


def test_gpu_check_names_the_wheels_to_carry(tmp_path, monkeypatch):
    from sim.bench import gpu_check

    monkeypatch.setattr(gpu_check, "NEEDED", ("torch", "monai", "onfh_no_such_module"))
    monkeypatch.setitem(gpu_check.CARRIED, "onfh_no_such_module", "onfh-no-such-module==1.0")
    assert gpu_check.missing_modules() == {"onfh_no_such_module": "onfh-no-such-module==1.0"}
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert json.loads((tmp_path / "gpu_check.json").read_text())["missing"] == {
        "onfh_no_such_module": "onfh-no-such-module==1.0"
    }


def test_gpu_check_runs_the_gpu_tests_and_records_each(tmp_path):
    from sim.bench import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--skip-bench"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    outcomes = report["tests"]["outcomes"]
    gpu_tests = {
        name
        for name, fn in globals().items()
        if name.startswith("test_") and any(m.name == "gpu" for m in getattr(fn, "pytestmark", []))
    }
    assert len(gpu_tests) >= 6 and {name.split("[")[0] for name in outcomes} == gpu_tests
    expected = "passed" if torch.cuda.is_available() else "skipped"
    assert all(v.startswith(expected) for v in outcomes.values()), outcomes
    assert report["gpu"]["cuda"] is torch.cuda.is_available() and "torch" in report["modules_used"]


# --------------------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
def test_preflight_and_simulation_share_see_the_real_gpu():
    from client import gpu, site_daemon

    info = gpu.describe_gpu()
    assert info["cuda"] and info["name"] and info["memory_gib"] > 0 and info["cuda_runtime"]
    assert site_daemon.check_device().detail.startswith(f"CUDA: {info['name']}")
    share = runner.gpus_per_site()
    assert 0.25 <= share <= 1.0
    assert runner.federation_config(4, 1, share).endswith(f"client-resources-num-gpus={share:g}")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [True, False])
def test_detector_trains_on_cuda(amp):
    import numpy as np

    from client.detector_training import predict_boxes, train_detector
    from shared_models.detection import YOLOX3D
    from shared_models.specs import DetectorConfig

    torch.manual_seed(0)
    model = YOLOX3D(DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8))
    rng = np.random.default_rng(0)
    volumes = rng.random((4, 1, 32, 48, 32), dtype=np.float32)
    boxes = np.tile(np.array([[16, 24, 16, 8, 10, 8]], np.float32), (4, 1))
    out = train_detector(
        model,
        volumes,
        boxes,
        steps=3,
        batch_size=2,
        lr=1e-3,
        weight_decay=0.0,
        device=torch.device("cuda"),
        amp=amp,
        seed=0,
    )
    assert np.isfinite(out["train-loss"]) and next(model.parameters()).is_cuda
    found, scores, _ = predict_boxes(model, volumes, device=torch.device("cuda"))
    assert found.shape == (4, 6) and np.isfinite(scores).all()
