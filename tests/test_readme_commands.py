"""The README's commands work as written (issue 18): the fast checks. The slow ones run real simulations:
shared patient ids and bit-identical runs in ``tests/test_determinism.py``, ``onfh sim bench --out results``
from another folder in ``tests/test_bench.py``, Ctrl-C in ``tests/test_interrupt.py``."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from sim.experiments.runner import absolute_paths

ROOT = Path(__file__).resolve().parents[1]


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_deployment_terminals_activate_the_venv_before_onfh():
    makefile = (ROOT / "Makefile").read_text()
    venv = re.search(r"^VENV\s*\?=\s*(\S+)", makefile, re.M).group(1)
    section = _section((ROOT / "README.md").read_text(), "Deploying across hospitals")
    # the first code block after each "Terminal N, <role>" heading (a terminal's first commands)
    firsts = re.findall(r"\*\*Terminal \d+, [^*]+\*\*.*?```bash\n(.*?)```", section, re.S)
    assert len(firsts) >= 2  # coordinator and site
    for block in firsts:
        lines = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
        first_onfh = next(i for i, line in enumerate(lines) if line.startswith("onfh"))
        assert any(
            f". {venv}/bin/activate" in line or f"source {venv}/bin/activate" in line for line in lines[:first_onfh]
        ), block


def test_run_config_paths_are_made_absolute_against_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = absolute_paths(
        {
            "data-root": "data",
            "out-dir": "results/run",
            "cache-dir": "",
            "seed": 3,
            "signing-key": "keys/k.pem",
            "site-ids": "A,B",
        }
    )
    assert rc == {
        "data-root": str(tmp_path / "data"),
        "out-dir": str(tmp_path / "results" / "run"),
        "cache-dir": "",
        "seed": 3,
        "signing-key": str(tmp_path / "keys" / "k.pem"),
        "site-ids": "A,B",
    }


def _write_site(root: Path, site: str, patients: list[str], splits: list[str]) -> None:
    folder = root / site
    folder.mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "study", "side", "ficat_stage", "box_lps_mm", "scanner"])
        for i, p in enumerate(patients):
            (folder / f"study-{i}").mkdir()
            w.writerow([p, f"study-{i}", "R", "0", "", "x"])
    with open(folder / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "split"])
        w.writerows(zip(patients, splits))


def test_pooled_site_keys_patients_by_site_and_patient(tmp_path):
    from sim.experiments.pooled import write_pooled_site

    # both hospitals number their patients P1, P2: the pooled site must keep four patients
    _write_site(tmp_path, "A", ["P1", "P2"], ["train", "val"])
    _write_site(tmp_path, "B", ["P1", "P2"], ["val", "train"])
    counts = write_pooled_site(tmp_path, ["A", "B"])
    assert counts == {"train": 2, "val": 2}
    with open(tmp_path / "POOLED" / "split.csv", newline="") as fh:
        splits = {r["patient_id"]: r["split"] for r in csv.DictReader(fh)}
    assert splits == {"A/P1": "train", "A/P2": "val", "B/P1": "val", "B/P2": "train"}
    with open(tmp_path / "POOLED" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["patient_id"], r["study"]) for r in rows) == [
        ("A/P1", "A-study-0"),
        ("A/P2", "A-study-1"),
        ("B/P1", "B-study-0"),
        ("B/P2", "B-study-1"),
    ]
