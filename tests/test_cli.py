"""The ``neurofed`` command end to end on tiny data, and its errors on bad configuration."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from neurofed.cli import main
from neurofed.models import BrainAgeModule

TINY = [
    "--data.shape", "[32,32,32]", "--data.spacing", "4.0", "--data.batch_size", "4",
    "--trainer.rounds", "2", "--trainer.enable_progress_bar", "false",
]


def _tiny_args(tmp_path: Path, roots: list[Path]) -> list[str]:
    root_arg = str(roots[0]) if len(roots) == 1 else "[" + ",".join(str(r) for r in roots) + "]"
    return [
        *TINY, "--data.root", root_arg, "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
    ]


def test_fit_tests_best_model_and_writes_predictions(tmp_path, tiny_sites, capsys):
    code = main(
        ["fit", "--config", "configs/brain_age_cpu.yaml", *_tiny_args(tmp_path, tiny_sites),
         "--model.init_args.channels", "[2,4,4,4,4,4]"]
    )
    assert code == 0
    out = capsys.readouterr().out
    best = tmp_path / "runs" / "brain_age_cpu" / "site-0" / "best.ckpt"
    assert best.is_file() and str(best) in out
    # The per-site table of the test split names every site and the pooled row.
    for site in ("ixi", "sald", "camcan", "pooled"):
        assert site in out
    module = BrainAgeModule.load_from_checkpoint(best, map_location="cpu")
    assert module.hparams.channels == [2, 4, 4, 4, 4, 4]
    run = tiny_sites[0] / "derivatives" / "neurofed" / "runs" / "brain_age_cpu"
    rows = list(csv.DictReader(open(run / "desc-age_predictions.tsv"), delimiter="\t"))
    assert {"participant_id", "session_id", "split", "age", "prediction", "gap", "gap_corrected"} <= set(rows[0])
    assert {r["split"] for r in rows} >= {"train", "test"}
    assert (run / "figures" / "desc-age_scatter.png").is_file()
    assert (tmp_path / "runs" / "brain_age_cpu" / "config-fit.yaml").is_file()


@pytest.mark.parametrize("resident", ["false", "true"])
def test_predict_subcommand_writes_bids_derivatives(tmp_path, tiny_bids, capsys, resident):
    args = [*_tiny_args(tmp_path, [tiny_bids]), "--data.resident", resident]
    assert main(["fit", "--config", "configs/brain_age_cpu.yaml", *args, "--model.init_args.channels", "[2,2,2,2,2,2]"]) == 0
    ckpt = tmp_path / "runs" / "brain_age_cpu" / "site-0" / "best.ckpt"
    table = tiny_bids / "derivatives" / "neurofed" / "runs" / "brain_age_cpu" / "desc-age_predictions.tsv"
    table.unlink()
    assert main(["predict", "--config", "configs/brain_age_cpu.yaml", *args, "--ckpt_path", str(ckpt)]) == 0
    rows = list(csv.DictReader(open(table), delimiter="\t"))
    assert len(rows) == sum(1 for _ in tiny_bids.glob("sub-*/**/*_T1w.nii.gz"))
    assert all(float(r["prediction"]) == float(r["prediction"]) for r in rows)


def test_unknown_key_fails_with_a_message(tmp_path, tiny_bids, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/brain_age_cpu.yaml", "--trainer.roundz", "3"])
    assert exit_info.value.code != 0
    assert "roundz" in capsys.readouterr().err


def test_wrong_type_fails_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/brain_age_cpu.yaml", "--trainer.rounds", "many"])
    assert exit_info.value.code != 0
    assert "rounds" in capsys.readouterr().err


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    code = main(["fit", "--config", "configs/brain_age_cpu.yaml", "--data.root", str(tmp_path / "nowhere")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "neurofed synth" in err and "Traceback" not in err


def test_synth_command_is_wired(tmp_path, capsys):
    code = main(["synth", "--out", str(tmp_path), "--sites", "ixi", "--subjects", "6", "--sizes", "equal",
                 "--resolution", "4"])
    assert code == 0
    assert (tmp_path / "ixi" / "participants.tsv").is_file()


def test_unknown_synth_site_is_a_clear_error(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--sites", "atlantis"]) != 0
    err = capsys.readouterr().err
    assert "atlantis" in err and "ixi" in err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "neurofed synth", "neurofed simulate"):
        assert command in out.replace("\n", " ")
