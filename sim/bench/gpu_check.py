"""The GPU checks of issue 19 in one go: the ``gpu`` tests, then ``onfh sim bench --only gpu``; one JSON.

``python -m sim.bench.gpu_check --out DIR`` (or ``scripts/gpu_check.sh DIR``, which first installs carried
wheels) writes ``DIR/gpu_check.json``: the GPU (:func:`client.gpu.describe_gpu`), which of the modules
the checks import are missing, every ``gpu`` test's outcome (pytest, ``-m gpu``, JUnit XML), the GPU
benchmark's rows, and the third-party modules that were imported (what a bare machine must have).

It needs only torch, numpy, scikit-learn, rich, psutil and pytest, which the lent GPU machines have, plus
MONAI and SimpleITK, which they lack (``scripts/gpu_check.sh wheels`` downloads those two). Flower, Ray,
pydicom and nibabel are not needed: the fork test then warms the training modules instead of the
ClientApp, and the simulation itself (Ray) is not run. Without CUDA it runs too (the tests skip, the
benchmark shrinks to plumbing size), which is how it is tried on a CPU machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

log = logging.getLogger("onfh.gpu_check")

REPO = Path(__file__).resolve().parents[2]
#: What the checks import beyond the standard library; ``CARRIED`` are absent from the lent GPU machines.
NEEDED = ("torch", "numpy", "sklearn", "rich", "psutil", "pytest", "monai", "SimpleITK")
CARRIED = {"monai": "monai==1.6.1", "SimpleITK": "SimpleITK==2.5.7"}
#: After the two sizes as shipped (deterministic settings, stager channels-last, detector not): what the
#: deterministic settings cost, and channels-last for the detector (the choices issue 19 leaves to measurement).
VARIANTS = (
    {"model_sizes": ("paper",), "stager_batches": (16, 256), "detector_batches": (4, 64), "deterministic": False},
    {"model_sizes": ("paper",), "stager_batches": (16,), "detector_batches": (4, 64), "channels_last": True},
)


def missing_modules(names=None) -> dict[str, str]:
    """``{module: pip requirement or reason}`` for each of ``names`` (default :data:`NEEDED`) that does not import."""
    missing = {}
    for name in NEEDED if names is None else names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing[name] = CARRIED.get(name, str(err))
    return missing


def run_gpu_tests(out: Path, timeout_s: float = 480) -> dict:
    """``pytest -m gpu tests/test_gpu.py`` in a fresh interpreter; ``{test name: passed|failed|skipped}``."""
    junit = out / "gpu_tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu.py",
        f"--junitxml={junit}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            detail = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
            outcomes[case.get("name")] = kind if kind == "passed" else f"{kind}: {detail[:500]}"
    return {
        "exit_code": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "outcomes": outcomes,
        "output_tail": proc.stdout[-4000:] + proc.stderr[-2000:],
    }


def third_party_modules() -> list[str]:
    """Top-level modules imported so far that are neither the standard library nor this project's."""
    project = {"client", "server", "shared_models", "strategies", "sim", "tests"}
    names = {n.split(".")[0] for n in sys.modules}
    return sorted(n for n in names if n not in sys.stdlib_module_names and n not in project and not n.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    """Run the checks; exit 0 when every ``gpu`` test passed (or skipped without CUDA) and the benchmark ran."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/gpu-check", help="output folder (default runs/gpu-check)")
    parser.add_argument("--quick", action="store_true", help="benchmark at the configured batches only, 10 steps")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--skip-bench", action="store_true", help="only the tests")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"missing": missing_modules()}
    path = out / "gpu_check.json"

    def write() -> None:
        path.write_text(json.dumps(report, indent=2, default=str))

    if report["missing"]:
        need = " ".join(v for v in report["missing"].values() if "==" in v)
        log.error("missing modules %s; carry wheels (scripts/gpu_check.sh wheels: %s)", sorted(report["missing"]), need)
        write()
        return 2
    if not args.skip_tests:  # first, in its own process: this one has not touched CUDA yet
        report["tests"] = run_gpu_tests(out)
        log.info("gpu tests: %s", report["tests"]["outcomes"])
        write()
    from client.gpu import describe_gpu

    report["gpu"] = describe_gpu()
    if not args.skip_bench:
        from sim.bench.core import print_table, run_benchmarks

        options = {"stager_batches": (16,), "detector_batches": (4,), "steps": 10} if args.quick else {}
        passes = [
            {**options, "model_sizes": (size,)}
            for size in (("default", "paper") if report["gpu"]["cuda"] else ("default",))
        ]
        if report["gpu"]["cuda"] and not args.quick:
            passes += VARIANTS
        rows: list = []
        t0 = time.perf_counter()
        for opts in passes:  # one pass at a time, written after each: a run cut short keeps what it measured
            result = run_benchmarks(["gpu"], gpu=opts)
            rows += result["sections"]["gpu"]
            report["bench"] = {
                "environment": result["environment"],
                "rows": rows,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            write()
        print_table(rows)
    report["modules_used"] = third_party_modules()
    write()
    log.info("wrote %s", path)
    tests_ok = args.skip_tests or report["tests"]["exit_code"] in (0, 5)  # 5: no test collected
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
