import dataclasses

import pytest

from shared_models.config import RunConfig, default_run_config, parse_report_groups
from tests.conftest import tiny_run_config


def test_pyproject_defaults_build_a_valid_config():
    cfg = RunConfig.from_run_config(default_run_config())
    assert cfg.site_ids == ("A", "B", "C", "D")
    assert cfg.train_sites == ("A",)
    assert cfg.report_groups == {"A-test": ("A",), "external-1": ("B",), "external-2": ("C", "D")}
    assert cfg.strategy in ("fedavg", "fedprox", "fedbn")


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("strategy", "fedsgd", "'strategy'"),
        ("detector-rounds", 0, "'detector-rounds'"),
        ("detector-lr", "fast", "'detector-lr'"),
        ("train-sites", "A,Z", "'train-sites'"),
        ("report-groups", "A-test", "'report-groups'"),
        ("stager-block-config", "2,x", "'stager-block-config'"),
        ("proximal-mu", -0.1, "'proximal-mu'"),
        ("amp", "yes", "'amp'"),
        ("crop-shape", "32,32", "'crop-shape'"),
        ("crop-margin-mm", -1.0, "'crop-margin-mm'"),
        ("detector-l1-rounds", -1, "'detector-l1-rounds'"),
        ("stager-fusion", "bogus", "'stager-fusion'"),
        ("stager-transition", "bogus", "'stager-transition'"),
        ("stager-dropout", 2.0, "'stager-dropout'"),
    ],
)
def test_bad_values_name_the_key(key, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        RunConfig.from_run_config(tiny_run_config(**{key: value}))


def test_missing_key_is_named():
    rc = tiny_run_config()
    del rc["seed"]
    with pytest.raises(ValueError, match="'seed'"):
        RunConfig.from_run_config(rc)


def test_int_accepted_for_float_but_bool_not_for_int():
    assert RunConfig.from_run_config(tiny_run_config(**{"proximal-mu": 1})).proximal_mu == 1.0
    with pytest.raises(ValueError, match="'seed'"):
        RunConfig.from_run_config(tiny_run_config(seed=True))


def test_partition_mapping(tiny_cfg):
    assert [tiny_cfg.site_for_partition(i) for i in range(4)] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="partition-id 4"):
        tiny_cfg.site_for_partition(4)


def test_report_groups_parse():
    assert parse_report_groups(" g1=A ; g2=B,C ") == {"g1": ("A",), "g2": ("B", "C")}


def test_paper_model_size_uses_paper_presets():
    from shared_models.specs import DetectorConfig
    from shared_models.stager import StagerConfig

    cfg = RunConfig.from_run_config(tiny_run_config(**{"model-size": "paper"}))
    assert cfg.detector == DetectorConfig.PAPER
    # the paper's architecture; the input standardisation is a run-config setting of either size
    assert dataclasses.replace(cfg.stager, input_norm=StagerConfig.PAPER.input_norm) == StagerConfig.PAPER
    for norm in ("none", "crop"):
        assert (
            RunConfig.from_run_config(
                tiny_run_config(**{"model-size": "paper", "stager-input-norm": norm})
            ).stager.input_norm
            == norm
        )


def test_stager_input_norm_is_checked():
    with pytest.raises(ValueError, match="stager-input-norm"):
        RunConfig.from_run_config(tiny_run_config(**{"stager-input-norm": "zscore"}))
    with pytest.raises(ValueError, match="stager-input-norm"):
        RunConfig.from_run_config(tiny_run_config(**{"model-size": "paper", "stager-input-norm": "zscore"}))


def test_crop_settings_reach_the_preprocessing_spec():
    cfg = RunConfig.from_run_config(tiny_run_config(**{"crop-shape": "48,40,32", "crop-margin-mm": 4}))
    assert cfg.spec.crop_shape == (48, 40, 32) and cfg.spec.crop_margin_mm == 4.0
    assert cfg.spec.hemi_shape == (32, 112, 64)  # the paper's detector input is fixed


@pytest.mark.parametrize(
    "l1_rounds, expected", [(0, [0, 0, 0, 0, 0]), (1, [0, 0, 0, 0, 1]), (2, [0, 0, 0, 1, 1]), (9, [1, 1, 1, 1, 1])]
)
def test_l1_box_loss_is_on_in_the_last_detector_rounds(l1_rounds, expected):
    cfg = RunConfig.from_run_config(tiny_run_config(**{"detector-rounds": 5, "detector-l1-rounds": l1_rounds}))
    assert [cfg.detector_l1_weight(r) for r in range(1, 6)] == expected


def test_each_phase_reads_its_own_run_config_keys():
    from shared_models.config import PhaseConfig
    from shared_models.specs import Phase

    keys = {
        "detector-rounds": 3,
        "detector-local-steps": 11,
        "detector-batch-size": 2,
        "detector-lr": 0.25,
        "detector-warmup-steps": 5,
        "detector-l1-rounds": 1,
        "stager-rounds": 7,
        "stager-local-steps": 13,
        "stager-batch-size": 6,
        "stager-lr": 0.5,
        "stager-warmup-steps": 9,
    }
    cfg = RunConfig.from_run_config(tiny_run_config(**keys))
    assert cfg.phase(Phase.DETECTOR) == PhaseConfig(
        rounds=3, local_steps=11, batch_size=2, lr=0.25, warmup_steps=5, l1_rounds=1
    )
    assert cfg.phase("stager") == PhaseConfig(rounds=7, local_steps=13, batch_size=6, lr=0.5, warmup_steps=9)
    assert list(cfg.phases) == ["detector", "stager"]  # training order
    assert cfg.model_config("detector") is cfg.detector and cfg.model_config(Phase.STAGER) is cfg.stager
    with pytest.raises(ValueError, match="phase must be 'detector' or 'stager', got 'crops'"):
        cfg.phase("crops")
    with pytest.raises(ValueError, match="'stager-batch-size'"):
        RunConfig.from_run_config(tiny_run_config(**{"stager-batch-size": 0}))
    with pytest.raises(ValueError, match="'detector-warmup-steps'"):
        RunConfig.from_run_config(tiny_run_config(**{"detector-warmup-steps": -1}))


def test_lr_schedule_runs_over_all_rounds_of_a_phase():
    cfg = RunConfig.from_run_config(
        tiny_run_config(
            **{
                "detector-rounds": 4,
                "detector-local-steps": 30,
                "detector-warmup-steps": 10,
                "stager-rounds": 2,
                "stager-local-steps": 7,
                "stager-warmup-steps": 100,
                "lr-schedule": "cosine",
            }
        )
    )
    assert cfg.lr_schedule_args("detector", 3) == {"step_offset": 60, "total_steps": 120, "warmup_steps": 10}
    assert cfg.lr_schedule_args("stager", 1) == {"step_offset": 0, "total_steps": 14, "warmup_steps": 14}
    constant = RunConfig.from_run_config(tiny_run_config(**{"lr-schedule": "constant"}))
    assert constant.lr_schedule_args("stager", 2)["total_steps"] is None
    with pytest.raises(ValueError, match="phase"):
        cfg.lr_schedule_args("crops", 1)
    with pytest.raises(ValueError, match="'lr-schedule'"):
        RunConfig.from_run_config(tiny_run_config(**{"lr-schedule": "step"}))


def test_cli_strategy_choices_are_the_run_configs():
    import argparse

    from shared_models.cli import build_parser
    from shared_models.config import STRATEGIES

    # the names users type (run-config key `strategy`, `--strategy`): the wire format
    assert STRATEGIES == ("fedavg", "fedprox", "fedbn", "fedmedian", "fedtrimmedavg", "krum")
    from shared_models.config import ROBUST_STRATEGIES

    assert ROBUST_STRATEGIES == ("fedmedian", "fedtrimmedavg", "krum")  # a subset, in the list's order
    assert ROBUST_STRATEGIES == tuple(s for s in STRATEGIES if s in ROBUST_STRATEGIES)
    found = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if "--strategy" in action.option_strings:
                found.append(tuple(action.choices))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    assert len(found) >= 2  # `onfh sim run` and `onfh coordinator launch` at least
    assert all(choices == STRATEGIES for choices in found)


def test_run_config_defaults_live_only_in_pyproject():
    import dataclasses

    from shared_models.config import PhaseConfig

    with_default = [
        f.name
        for cls in (RunConfig, PhaseConfig)
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == ["l1_rounds"]  # the stager has no L1 rounds: 0 is structure, not a default
