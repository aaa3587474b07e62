"""Issue 6 baselines: split-sites, the pooled site, the baselines grid, the cross-site matrix, intervals over seeds."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from shared_models.config import RunConfig, default_run_config
from sim.experiments import compare
from sim.experiments.pooled import POOLED_SITE, pooled_overrides, write_pooled_site
from tests.conftest import tiny_run_config

MANIFEST_HEADER = "patient_id,study,side,ficat_stage,box_lps_mm,scanner\n"


def _site(root, site, patients, splits):
    """A site folder with one study per patient (two heads) and a split.csv."""
    folder = root / site
    folder.mkdir(parents=True)
    lines = [MANIFEST_HEADER]
    for i, p in enumerate(patients):
        (folder / f"study-{i}").mkdir()
        (folder / f"study-{i}" / "x.dcm").write_bytes(b"")
        lines += [f"{p},study-{i},L,0,,S\n", f"{p},study-{i},R,I,,S\n"]
    (folder / "manifest.csv").write_text("".join(lines))
    (folder / "split.csv").write_text("patient_id,split\n" + "".join(f"{p},{s}\n" for p, s in zip(patients, splits)))


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_pooled_site_holds_train_and_val_of_every_pooled_site_and_no_test_head(tmp_path):
    from client.site_data import read_manifest

    _site(tmp_path, "A", ["A-1", "A-2", "A-3"], ["train", "val", "test"])
    _site(tmp_path, "B", ["B-1", "B-2"], ["train", "test"])
    _site(tmp_path, "C", ["C-1"], ["train"])  # not pooled
    counts = write_pooled_site(tmp_path, ["A", "B"])
    assert counts == {"train": 2, "val": 1}
    pooled = tmp_path / POOLED_SITE
    manifest = _rows(pooled / "manifest.csv")
    # patient ids are local to a hospital: the pooled site keys them by (site, patient) as "<site>/<id>"
    assert sorted({r["patient_id"] for r in manifest}) == ["A/A-1", "A/A-2", "B/B-1"]
    assert len(manifest) == 6  # both heads of each pooled patient
    assert {r["patient_id"]: r["split"] for r in _rows(pooled / "split.csv")} == {
        "A/A-1": "train",
        "A/A-2": "val",
        "B/B-1": "train",
    }
    for r in manifest:  # every study is a link to the original folder, not a copy
        link = pooled / r["study"]
        assert link.is_symlink() and link.resolve() == (tmp_path / r["study"][:1] / r["study"][2:]).resolve()
    heads = read_manifest(pooled, POOLED_SITE)  # a valid site for the ClientApp
    assert {h.split for h in heads} == {"train", "val"}

    # rebuilt for another seed's splits: the old rows go, the preprocessing cache stays
    (pooled / ".onfh-cache").mkdir()
    (pooled / ".onfh-cache" / "kept").write_text("x")
    (tmp_path / "A" / "split.csv").write_text("patient_id,split\nA-1,test\nA-2,train\nA-3,val\n")
    write_pooled_site(tmp_path, ["A", "B"])
    assert {r["patient_id"] for r in _rows(pooled / "manifest.csv")} == {"A/A-2", "A/A-3", "B/B-1"}
    assert (pooled / ".onfh-cache" / "kept").exists()


def test_pooled_site_keeps_two_sites_patients_with_one_id_and_refuses_missing_files(tmp_path):
    _site(tmp_path, "A", ["P-1"], ["train"])
    _site(tmp_path, "B", ["P-1"], ["train"])
    assert write_pooled_site(tmp_path, ["A", "B"]) == {"train": 2, "val": 0}  # two patients, not one
    (tmp_path / "B" / "split.csv").unlink()
    with pytest.raises(FileNotFoundError, match="split.csv"):
        write_pooled_site(tmp_path, ["B"])
    with pytest.raises(ValueError):
        write_pooled_site(tmp_path, [POOLED_SITE])


def test_pooled_site_reads_rows_as_the_site_does_and_leaves_out_unreadable_ones(tmp_path, caplog):
    _site(tmp_path, "A", ["A-1", "A-2"], ["train", "train"])
    manifest = tmp_path / "A" / "manifest.csv"
    # a row that is not UTF-8, a head the site already has (the site refuses the second), and
    # A-2's left head rewritten padded with spaces (the site strips them)
    lines = manifest.read_bytes().splitlines(keepends=True)
    lines[3] = b" A-2 , study-1 ,L,0,,S\n"
    manifest.write_bytes(b"".join(lines) + b"A-\xff,study-0,L,0,,S\n" + b"A-1,study-0,L,0,,S\n")
    with caplog.at_level("WARNING", logger="sim.experiments.pooled"):
        counts = write_pooled_site(tmp_path, ["A"])
    assert counts == {"train": 2, "val": 0}
    rows = _rows(tmp_path / POOLED_SITE / "manifest.csv")
    assert [(r["patient_id"], r["study"]) for r in rows].count(("A/A-2", "A-study-1")) == 2  # stripped like the site
    assert len(rows) == 4 and all(r["patient_id"] in ("A/A-1", "A/A-2") for r in rows)
    assert "manifest.csv row 6: not valid UTF-8" in caplog.text and "row not pooled" in caplog.text
    assert "manifest.csv row 7: the same patient and side already appear in row 2" in caplog.text
    assert "A-\ufffd" not in caplog.text  # the refusal names the row, never its values


def _one_site(root, rows, split=(("p1", "train"),)):
    folder = root / "A"
    folder.mkdir(parents=True)
    (folder / "manifest.csv").write_text(MANIFEST_HEADER + "".join(r + "\n" for r in rows))
    (folder / "split.csv").write_text("patient_id,split\n" + "".join(f"{p},{s}\n" for p, s in split))
    return folder


def _links(root):
    return [p for p in root.rglob("*") if p.is_symlink()]


@pytest.mark.parametrize(
    "study",
    ["../../../outside", "/etc", "s1/../../../outside/evil", "s1/../../../../outside/evil", "s1/../../../outside//etc"],
)
def test_pooled_site_refuses_a_study_outside_the_site_and_never_links_outside_itself(tmp_path, caplog, study):
    data = tmp_path / "data"
    (_one_site(data, ["p1,s1,L,0,,x", f"p1,{study},R,0,,x"]) / "s1").mkdir()
    (tmp_path / "outside").mkdir()
    with caplog.at_level("WARNING", logger="sim.experiments.pooled"):
        assert write_pooled_site(data, ["A"]) == {"train": 1, "val": 0}
    pooled = data / POOLED_SITE
    assert [(r["patient_id"], r["study"], r["side"]) for r in _rows(pooled / "manifest.csv")] == [("A/p1", "A-s1", "L")]
    links = _links(tmp_path)
    assert links == [pooled / "A-s1"] and links[0].resolve() == (data / "A" / "s1").resolve()
    assert "manifest.csv row 3: study must be a path relative to the site root, inside it" in caplog.text
    assert "outside" not in caplog.text and "etc" not in caplog.text  # no value of the row


def test_pooled_site_links_a_nested_study_inside_itself_and_the_pooled_site_reads_it(tmp_path):
    from client.site_data import check_manifest

    (_one_site(tmp_path, ["p1,sub/s1,L,0,,x", "p1,sub/s1,R,I,,x"]) / "sub" / "s1").mkdir(parents=True)
    assert write_pooled_site(tmp_path, ["A"]) == {"train": 1, "val": 0}
    pooled = tmp_path / POOLED_SITE
    link = pooled / "A-sub" / "s1"
    assert link.is_symlink() and not (pooled / "A-sub").is_symlink()
    assert link.resolve() == (tmp_path / "A" / "sub" / "s1").resolve()
    heads, refused = check_manifest(pooled, POOLED_SITE)
    assert refused == [] and [(h.patient_id, h.study, h.side, h.stage) for h in heads] == [
        ("A/p1", "A-sub/s1", "L", 0),
        ("A/p1", "A-sub/s1", "R", 1),
    ]
    write_pooled_site(tmp_path, ["A"])  # rebuilt: the nested folder is replaced, not followed
    assert _links(pooled) == [link]


def test_pooled_site_refuses_a_study_inside_another_and_a_taken_link_name(tmp_path, caplog):
    folder = _one_site(tmp_path, ["p1,s1,L,0,,x", "p1,s1/x,R,0,,x"], split=[("p1", "train"), ("p2", "train")])
    (folder / "s1" / "x").mkdir(parents=True)
    other = tmp_path / "A-b"
    (other / "c").mkdir(parents=True)
    (folder / "b-c").mkdir()
    with open(folder / "manifest.csv", "a") as fh:
        fh.write("p2,b-c,L,0,,x\n")
    (other / "manifest.csv").write_text(MANIFEST_HEADER + "q1,c,L,0,,x\n")
    (other / "split.csv").write_text("patient_id,split\nq1,train\n")
    with caplog.at_level("WARNING", logger="sim.experiments.pooled"):
        write_pooled_site(tmp_path, ["A", "A-b"])
    rows = _rows(tmp_path / POOLED_SITE / "manifest.csv")
    # the link "A-b-c" is A's study b-c; site A-b's study c would get the same name and is refused, not shared
    assert [(r["patient_id"], r["study"]) for r in rows] == [("A/p1", "A-s1"), ("A/p2", "A-b-c")]
    assert "study lies inside another pooled study" in caplog.text
    assert "link name is taken by another pooled site's study" in caplog.text
    assert (tmp_path / POOLED_SITE / "A-b-c").resolve() == (folder / "b-c").resolve()
    assert sorted(_links(tmp_path)) == [tmp_path / POOLED_SITE / "A-b-c", tmp_path / POOLED_SITE / "A-s1"]


def test_pooled_site_writes_the_box_the_site_read_so_the_pooled_site_reads_it_too(tmp_path):
    from client.site_data import check_manifest

    # two spaces after the first number: the site reads it; the raw field would be neutralised
    (
        _one_site(tmp_path, ["p1,s1,R,0,-100  -24 -24 -60 24 24,x", "p1,s1,L,II,60.25 -24 -24 100 24 24.5,x"]) / "s1"
    ).mkdir()
    write_pooled_site(tmp_path, ["A"])
    heads, refused = check_manifest(tmp_path / POOLED_SITE, POOLED_SITE)
    assert refused == []
    assert [h.box_lps_mm for h in heads] == [
        (-100.0, -24.0, -24.0, -60.0, 24.0, 24.0),
        (60.25, -24.0, -24.0, 100.0, 24.0, 24.5),
    ]
    assert [h.stage for h in heads] == [0, 2]


def test_pooled_overrides_match_the_federations_total_steps():
    base = {**default_run_config(), "detector-local-steps": 30, "stager-local-steps": 40}
    o = pooled_overrides(base, ["A", "B", "C"])
    assert o["detector-local-steps"] == 90 and o["stager-local-steps"] == 120
    assert o["site-ids"].split(",") == ["A", "B", "C", "D", POOLED_SITE]
    cfg = RunConfig.from_run_config({**tiny_run_config(), **o})
    assert (
        cfg.train_sites == (POOLED_SITE,) and cfg.split_sites == ("A", "B", "C") and cfg.pooled_sites == ("A", "B", "C")
    )


def test_split_sites_default_to_train_sites_and_must_be_known():
    assert RunConfig.from_run_config(tiny_run_config(**{"train-sites": "A,C"})).split_sites == ("A", "C")
    cfg = RunConfig.from_run_config(tiny_run_config(**{"train-sites": "A", "split-sites": "A,B"}))
    assert cfg.split_sites == ("A", "B") and cfg.pooled_sites == ()
    with pytest.raises(ValueError, match="split-sites"):
        RunConfig.from_run_config(tiny_run_config(**{"split-sites": "A,Z"}))


def test_prepare_splits_keeps_splits_fixed_across_local_and_federated_cells(tmp_path):
    """local-A trains only at A, yet B keeps its 8:1:1 split, the same as in the federated cell."""
    from sim.experiments.experiment import prepare_splits

    for site in "ABCD":
        _site(tmp_path, site, [f"{site}-{i}" for i in range(20)], ["test"] * 20)
    common = {"data-root": str(tmp_path), "split-sites": "A,B", "seed": 4}
    splits = {}
    for name, train in (("federated", "A,B"), ("local-A", "A")):
        prepare_splits(RunConfig.from_run_config(tiny_run_config(**common, **{"train-sites": train})))
        splits[name] = {s: (tmp_path / s / "split.csv").read_text() for s in "ABCD"}
    assert splits["federated"] == splits["local-A"]
    b = {r["split"] for r in _rows(tmp_path / "B" / "split.csv")}
    assert b == {"train", "val", "test"}
    assert {r["split"] for r in _rows(tmp_path / "C" / "split.csv")} == {"test"}
    with pytest.raises(ValueError, match="split-sites"):
        prepare_splits(
            RunConfig.from_run_config(
                tiny_run_config(**{"data-root": str(tmp_path), "train-sites": "A,C", "split-sites": "A,B"})
            )
        )


def test_baselines_grid_is_federated_local_per_site_and_pooled():
    base = {**default_run_config(), "train-sites": "A,B", "detector-local-steps": 10, "stager-local-steps": 20}
    variants = {v.name: v.overrides for v in compare.grid_variants("baselines", ["A", "B", "C", "D"], base)}
    assert list(variants) == ["federated", "local-A", "local-B", "pooled"]
    assert variants["federated"]["train-sites"] == "A,B"
    assert variants["local-B"] == {"split-sites": "A,B", "train-sites": "B"}
    assert variants["pooled"]["stager-local-steps"] == 40
    for overrides in variants.values():  # every cell is a valid run config with the same split
        cfg = RunConfig.from_run_config({**tiny_run_config(), **base, **overrides})
        assert set(cfg.split_sites) == {"A", "B"}
    with pytest.raises(ValueError, match="two training sites"):
        compare.grid_variants("baselines", ["A"], {**base, "train-sites": "A"})
    both = compare.grid_variants("baselines,strategies", ["A", "B"], base)
    assert len(both) == 4 + 5


def test_report_groups_for_training_sites():
    groups = {"A-test": ("A",), "external-1": ("B",), "external-2": ("C", "D")}
    assert compare.report_groups_for(["A", "B"], groups) == "A-test=A;B-test=B;external-2=C,D"
    assert compare.report_groups_for(["A", "C"], groups) == "A-test=A;C-test=C;external-1=B;external-2=D"


def test_cross_site_matrix_is_the_mean_over_seeds_per_model_and_site():
    def report(auc_a, auc_b):
        return {
            "per_site": {
                "A": {"n": 5, "macro": {"auc": auc_a, "accuracy": 0.5}},
                "B": {"n": 4, "macro": {"auc": auc_b, "accuracy": 0.5}},
            }
        }

    rows = (
        compare.cross_site_rows("local-A", 0, report(0.9, 0.6))
        + compare.cross_site_rows("local-A", 1, report(0.8, 0.7))
        + compare.cross_site_rows("federated", 0, report(0.85, None))
    )  # undefined AUC: null in report.json
    matrix = compare.cross_site_matrix(rows)
    assert matrix["local-A"] == pytest.approx({"A": 0.85, "B": 0.65})
    assert matrix["federated"] == {"A": 0.85}  # an undefined AUC is left out, not averaged as 0


def test_seed_interval_is_the_student_t_interval():
    values = [0.80, 0.86, 0.83]
    low, high = compare.seed_interval(values)
    t_975_2 = 4.302652729749464  # Student t quantile, 2 degrees of freedom (tables)
    half = t_975_2 * np.std(values, ddof=1) / math.sqrt(3)
    assert (low, high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert all(math.isnan(v) for v in compare.seed_interval([0.8]))
    assert compare.seed_interval([0.7, 1.0, 1.0])[1] == 1.0  # an AUC interval never passes 1


def test_load_crops_takes_todays_split_not_the_one_at_crop_time(tmp_path):
    from client import tasks

    heads = [SimpleNamespace(stage=s, split=sp) for s, sp in ((0, "train"), (None, "test"), (1, "test"), (2, "val"))]
    site = SimpleNamespace(site_id="A", cache_dir=tmp_path, heads=heads)
    (tmp_path / "crops").mkdir()
    np.savez(
        tmp_path / "crops" / "k.npz",
        crops=np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1, 1),
        stages=np.array([0, 1, 2]),
        splits=np.array(["test", "test", "test"]),
        low_confidence=np.int64(0),
    )
    crops, stages = tasks.load_crops(site, "k").select("test")
    assert crops.ravel().tolist() == [1.0] and stages.tolist() == [1]  # the staged head 3, test today
    heads.append(SimpleNamespace(stage=0, split="train"))  # manifest changed since cropping
    with pytest.raises(ValueError, match="manifest changed"):
        tasks.load_crops(site, "k")


def test_compare_grid_writes_the_cross_site_matrix_and_a_page(tmp_path, monkeypatch):
    def fake_experiment(overrides, console=None):
        auc = 0.9 if overrides.get("train-sites") == "A" else 0.7
        return {
            "sites": {"A-test": {"sites": ["A"], "n": 4, "macro": {"auc": auc}}},
            "detector": {},
            "per_site": {"A": {"n": 4, "macro": {"auc": auc}}, "B": {"n": 3, "macro": {"auc": auc - 0.1}}},
        }

    monkeypatch.setattr("sim.experiments.experiment.run_experiment", fake_experiment)
    variants = [compare.Variant("local-A", {"train-sites": "A"}), compare.Variant("local-B", {"train-sites": "B"})]
    compare.run_compare({}, tmp_path, variants, [0, 1])
    saved = json.loads((tmp_path / "compare.json").read_text())
    matrix = saved["cross_site"]["macro_auc"]
    assert matrix["local-A"] == pytest.approx({"A": 0.9, "B": 0.8})
    assert matrix["local-B"] == pytest.approx({"A": 0.7, "B": 0.6})
    page = (tmp_path / "report.html").read_text()
    assert "Cross-site matrix" in page and 'href="local-B/seed-1/report.html"' in page
    assert (tmp_path / "figures" / "cross_site_macro_auc.png").stat().st_size > 1000


def test_grid_checks_every_cell_before_the_first_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "sim.experiments.experiment.run_experiment", lambda overrides, console=None: calls.append(overrides)
    )
    base = {"data-root": str(tmp_path), "train-sites": "A,B"}
    variants = [compare.Variant("ok"), compare.Variant("bad", {"train-sites": "A,Q"})]
    with pytest.raises(ValueError, match=r"variant bad: .*Q"):
        compare.run_compare(base, tmp_path / "grid", variants, [0])
    assert calls == []  # nothing ran
    with pytest.raises(ValueError, match="no variants"):
        compare.run_compare(base, tmp_path / "grid", [], [0])
