"""The ``neurofed`` command end to end on tiny data, and its errors on bad configuration."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

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
    # A centralized run over three roots: each root has its own figure, and nothing says "FedAvg".
    for root in tiny_sites:
        folder = root / "derivatives" / "neurofed" / "runs" / "brain_age_cpu"
        sidecar = json.loads((folder / "desc-age_predictions.json").read_text())
        assert sidecar["GeneratedBy"]["Strategy"] == "centralized"
        assert sidecar["TrainingRun"]["ThisDataset"].startswith("one of the datasets the run trained on")
        assert (folder / "figures" / "desc-age_scatter.png").is_file()
        own = {r["participant_id"] for r in csv.DictReader(open(folder / "desc-age_predictions.tsv"), delimiter="\t")
               if r["split"] == "test"}
        assert own and all((root / pid).is_dir() for pid in own)  # its own subjects only
    # The model carries its run's record: the datasets, their split sizes, each one's bias correction.
    record = torch.load(best, weights_only=False)["neurofed_training"]
    assert record["run"] == "brain_age_cpu" and set(record["datasets"]) == {"ixi", "sald", "camcan"}
    assert all(entry["splits"]["train"]["subjects"] > 0 for entry in record["datasets"].values())


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


def test_a_model_applied_to_a_new_dataset_keeps_its_runs_split_and_correction(tmp_path, tiny_bids, make_bids,
                                                                              capsys):
    args = [*_tiny_args(tmp_path, [tiny_bids]), "--model.init_args.channels", "[2,2,2,2,2,2]"]
    assert main(["fit", "--config", "configs/brain_age_cpu.yaml", *args]) == 0
    ckpt = tmp_path / "runs" / "brain_age_cpu" / "site-0" / "best.ckpt"
    record = torch.load(ckpt, weights_only=False)["neurofed_training"]
    stored = record["datasets"]["tiny"]["bias_correction"]
    trained = tiny_bids / "derivatives" / "neurofed" / "runs" / "brain_age_cpu" / "desc-age_predictions.tsv"
    splits_at_fit = {(r["participant_id"], r["session_id"]): r["split"]
                     for r in csv.DictReader(open(trained), delimiter="\t")}

    new = make_bids(tmp_path / "new", n_subjects=8, seed=9, name="newsite")
    predict = ["predict", "--config", "configs/brain_age_cpu.yaml", *args, "--data.root", str(new),
               "--ckpt_path", str(ckpt), "--trainer.run_name", "applied"]
    assert main(predict) == 0
    folder = new / "derivatives" / "neurofed" / "runs" / "applied"
    rows = list(csv.DictReader(open(folder / "desc-age_predictions.tsv"), delimiter="\t"))
    assert len(rows) == sum(1 for _ in new.glob("sub-*/**/*_T1w.nii.gz")) and {r["split"] for r in rows} == {"unseen"}
    for r in rows:  # the run's correction, not one refitted on the new dataset
        age, gap = float(r["age"]), float(r["gap"])
        expected = gap - (stored["slope"] * age + stored["intercept"])
        assert float(r["gap_corrected"]) == pytest.approx(expected, abs=2e-3)
    sidecar = json.loads((folder / "desc-age_predictions.json").read_text())
    assert sidecar["split"]["Levels"] == {"unseen": sidecar["split"]["Levels"]["unseen"]}
    assert "brain_age_cpu" in sidecar["BiasCorrection"]["FittedOn"] and "tiny" in sidecar["BiasCorrection"]["FittedOn"]
    assert sidecar["BiasCorrection"]["Slope"] == pytest.approx(stored["slope"])
    assert sidecar["TrainingRun"]["Run"] == "brain_age_cpu" and "never saw" in sidecar["TrainingRun"]["ThisDataset"]
    assert (folder / "figures" / "desc-age_scatter.png").is_file()

    # Back on the dataset it trained on, the same checkpoint restores the run's split, row for row.
    assert main(["predict", "--config", "configs/brain_age_cpu.yaml", *args, "--ckpt_path", str(ckpt),
                 "--trainer.run_name", "again"]) == 0
    again = tiny_bids / "derivatives" / "neurofed" / "runs" / "again" / "desc-age_predictions.tsv"
    assert {(r["participant_id"], r["session_id"]): r["split"]
            for r in csv.DictReader(open(again), delimiter="\t")} == splits_at_fit


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
    for command in ("fit", "validate", "test", "predict", "synth", "simulate", "status", "federation"):
        assert f"\n    {command} " in out or f"\n    {command}\n" in out, command


def test_fit_keeps_every_site_record_and_status_reads_it(tmp_path, tiny_bids, capsys, monkeypatch):
    import neurofed.plots as plots
    from neurofed.status import read_status

    drawn, draw = {}, plots.loss_per_round
    monkeypatch.setattr(plots, "loss_per_round", lambda curves, path, **kw: drawn.update(
        {path.name: (sorted(curves), kw["ylabel"])}) or draw(curves, path, **kw))
    args = [*_tiny_args(tmp_path, [tiny_bids]), "--model.init_args.channels", "[2,2,2,2,2,2]"]
    assert main(["fit", "--config", "configs/brain_age_cpu.yaml", *args]) == 0
    # L1 is in years; one site has no separate pooled curve to hide its own
    assert drawn == {"val_loss.png": (["pooled validation loss"], "validation loss (L1, years)"),
                     "loss.png": (["training", "validation"], "loss (L1, years)")}
    site = tmp_path / "runs" / "brain_age_cpu" / "site-0"
    for name in ("config-fit.yaml", "history.json", "test_metrics.json", "loss.png", "best.ckpt"):
        assert (site / name).is_file(), name
    history = json.loads((site / "history.json").read_text())
    assert [row["round"] for row in history] == [1, 2] and "val/site/mae" in history[0]
    assert "pooled" in json.loads((site / "test_metrics.json").read_text())
    capsys.readouterr()
    assert main(["status", str(tmp_path / "runs" / "brain_age_cpu")]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 rounds done, finished (tested)" in out and "best round" in out and "site-0: last round 2" in out
    assert read_status(tmp_path / "runs" / "brain_age_cpu").best is not None
    # The same command again would replace that run: it is refused before any work, naming both ways out.
    assert main(["fit", "--config", "configs/brain_age_cpu.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert "brain_age_cpu" in err and "--ckpt_path last" in err and "--trainer.overwrite true" in err
    assert len(err.strip().splitlines()) == 1
    # Resuming it with another strategy is refused as well, and leaves the run's configuration as it was.
    configs = {path: path.read_text() for path in (site / "config-fit.yaml", site.parent / "config-fit.yaml")}
    assert main(["fit", "--config", "configs/brain_age_cpu.yaml", *args, "--ckpt_path", "last", "--trainer.rounds",
                 "3", "--trainer.strategy", "neurofed.federated.strategies.FedMedian"]) == 2
    err = capsys.readouterr().err
    assert "was trained with strategy 'FedAvg(weighted=True)', but this resume asks for 'FedMedian()'" in err, err
    assert len(err.strip().splitlines()) == 1 and all(path.read_text() == text for path, text in configs.items())


def test_a_started_run_is_never_replaced_silently(tmp_path, tiny_bids, capsys):
    run = tmp_path / "runs" / "brain_age_cpu"
    (run / "site-0").mkdir(parents=True)
    (run / "site-0" / "committed").write_text("1\n")  # a run that committed a round, then stopped
    base = ["fit", "--config", "configs/brain_age_cpu.yaml", *_tiny_args(tmp_path, [tiny_bids])]
    assert main(base) == 2
    assert "committed" in capsys.readouterr().err
    assert not (run / "config-fit.yaml").exists()  # refused before any work
    (run / "history.json").write_text("[]")  # the run-wide history is shared: every site refuses
    assert main([*base, "--trainer.federation.num_sites", "2", "--trainer.federation.site_rank", "1"]) == 2


def test_status_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and "not a neurofed run" in err and len(err.splitlines()) == 1
    assert main(["status", str(tmp_path / "missing")]) == 2


def test_missing_sdmt_root_suggests_the_ms_cohort(tmp_path, capsys):
    code = main(["fit", "--config", "configs/sdmt_deep_cpu.yaml"])
    assert code == 2
    err = capsys.readouterr().err
    assert "`neurofed synth --out data/synth_ms --cohort ms`" in err


def test_missing_age_root_suggests_healthy_sites(tmp_path, capsys):
    assert main(["fit", "--config", "configs/brain_age_cpu.yaml", "--data.root", "data/elsewhere/ixi"]) == 2
    err = capsys.readouterr().err
    assert "`neurofed synth --out data/elsewhere`" in err and "--cohort" not in err


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_usage_names_every_command(capsys):
    usage = _help(capsys).splitlines()[0]
    for command in ("fit", "validate", "test", "predict", "synth", "simulate", "status", "federation"):
        assert command in usage
    assert usage.startswith("usage: neurofed ")


def test_help_imports_neither_torch_nor_lightning():
    import subprocess
    import sys

    code = ("import sys\nfrom neurofed.cli import main\n"
            "for argv in (['--help'], ['synth', '--help'], ['status', '--help'], ['simulate', '--help'],\n"
            "             ['federation', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]


def test_every_option_has_a_description_and_a_default(capsys):
    import neurofed.training_cli as cli

    class Parsed(Exception):
        pass

    class Probe(cli.NeurofedCLI):  # stops once the parsers are built
        def parse_arguments(self, parser, args):
            raise Parsed(self._subcommand_parsers["fit"])

    original = cli.NeurofedCLI
    cli.NeurofedCLI = Probe
    try:
        with pytest.raises(Parsed) as parsed:
            cli.cli_main(["fit"])
    finally:
        cli.NeurofedCLI = original
    parser = parsed.value.args[0]
    options = [a for a in parser._actions if a.dest.startswith(("trainer.", "data."))
               and not a.dest.endswith(".help") and a.option_strings and a.dest not in ("trainer", "data")]
    assert len(options) > 35
    for action in options:
        assert action.help and len(action.help) > 10, action.dest
        assert "``" not in action.help and ":class:" not in action.help, action.dest
    text = _help(capsys, "fit")
    assert "``" not in text and ":class:`" not in text
    assert text.startswith("usage: neurofed fit")
    assert text.count("default:") >= len(options)
    for name in ("BrainAgeModule", "SDMTModule"):
        assert name in text.replace("\n", " ")
    cache = text[text.index("  --data.cache_dir CACHE_DIR"):].split("--data.augment")[0]
    assert "NEUROFED_CACHE" in cache and "~/.cache/neurofed" in cache
    assert "--trainer.overwrite" in text and "--ckpt_path last" in text.replace("\n", " ")


def test_synth_help_shows_defaults(capsys):
    text = _help(capsys, "synth")
    assert "(default: 20)" in text and "(default: 2.0)" in text


def test_model_help_describes_every_option_without_listing_torch():
    import subprocess
    import sys

    from timeouts import STARTUP_S, scaled

    # a fresh process, as a user's: the help of one model class, with its options described
    full = subprocess.run([sys.executable, "-m", "neurofed", "fit", "--model.help", "neurofed.BrainAgeModule"],
                          capture_output=True, text=True, timeout=scaled(STARTUP_S)).stdout
    text = full.replace("\n", " ").split("Help for", 1)[1]
    for option, words in (("lr", "learning rate"), ("channels", "Output channels"), ("loss", "soft-label"),
                          ("sigma", "Gaussian soft label"), ("norm", "GroupNorm")):
        assert words in text.split(f"--model.{option} ", 1)[1][:400], option
    assert "torch.nn.Linear" not in text and "other classes, by class_path" in text
    assert len(full.splitlines()) < 120


def test_synth_flags_read_the_right_way_round(capsys):
    text = _help(capsys, "synth")
    assert "hide the progress bars (shown by default)" in text and "(default: True)" not in text
    assert "the same seed writes the same sites" in text.replace("\n", " ").replace("  ", " ")


@pytest.mark.slow
def test_ctrl_c_during_fit_is_one_line_naming_the_committed_round_and_the_resume(tmp_path, tiny_bids):
    import signal
    import subprocess
    import sys
    import time

    from timeouts import STARTUP_S, scaled

    args = [*_tiny_args(tmp_path, [tiny_bids]), "--model.init_args.channels", "[2,2,2,2,2,2]",
            "--trainer.rounds", "500"]
    # as from a terminal: a test runner started in the background has SIGINT ignored, and children inherit that
    proc = subprocess.Popen([sys.executable, "-m", "neurofed", "fit", "--config", "configs/brain_age_cpu.yaml", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    committed = tmp_path / "runs" / "brain_age_cpu" / "site-0" / "committed"
    deadline = time.monotonic() + scaled(STARTUP_S + 120)
    while not committed.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed.is_file(), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=scaled(60))
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("neurofed: interrupted")]
    assert len(lines) == 1, err[-3000:]
    round_done = int(committed.read_text())
    assert f"round {round_done} is committed in {committed.parent}" in lines[0]
    assert lines[0].endswith("--trainer.rounds 500 --ckpt_path last")
    # status says the same, and gives the command that resumes from the saved configuration
    status = subprocess.run([sys.executable, "-m", "neurofed", "status", str(committed.parent.parent)],
                            capture_output=True, text=True, timeout=scaled(STARTUP_S))
    config = committed.parent.parent / "config-fit.yaml"
    assert f"resume: neurofed fit --config {config} --ckpt_path last" in status.stdout, status.stdout
