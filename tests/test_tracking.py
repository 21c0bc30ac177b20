"""W&B as its users expect, checked on real offline runs read back from their ``.wandb`` files.

One group per federation, one run per site (``job_type: site``, name = run + site), the resolved config,
per-round site and pooled metrics at ``trainer/global_step`` = round, the best round and the test table in the
summary, the figures, the test table as a ``wandb.Table`` and the best checkpoint as a model artifact.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from timeouts import scaled

from neurofed.lightning_compat import wandb_init_kwargs
from neurofed.tracking import configure_site_loggers, flatten_config, group_wandb_runs


def test_configure_uses_the_site_name_and_never_imports_wandb(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    sys.modules.pop("wandb", None)
    logger = WandbLogger(save_dir=str(tmp_path), name=None)
    trainer = SimpleNamespace(loggers=[logger, object()], run_name="demo")
    configure_site_loggers(trainer, SimpleNamespace(site_names=["sald"]))
    assert wandb_init_kwargs(logger)["name"] == "demo-sald"
    assert "wandb" not in sys.modules  # a GPU machine without wandb runs everything else


def test_user_choices_win(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "online")
    logger = WandbLogger(save_dir=str(tmp_path), name="mine", group="g", job_type="j")
    group_wandb_runs([logger], run_name="fed1", site_name="ixi")
    init = wandb_init_kwargs(logger)
    assert (init["name"], init["group"], init["job_type"], init.get("mode")) == ("mine", "g", "j", None)


def test_config_is_flat_without_init_args():
    config = {"trainer": {"rounds": 3, "federation": {"num_sites": 3}},
              "model": {"class_path": "neurofed.models.BrainAgeModule", "init_args": {"lr": 0.001, "channels": [2, 4]}},
              "data": {"root": "data/synth/ixi", "shape": (32, 32, 32), "strict": False, "odd": object}}
    flat = flatten_config(config)
    assert flat["trainer.rounds"] == 3 and flat["trainer.federation.num_sites"] == 3
    assert flat["model.class_path"] == "neurofed.models.BrainAgeModule" and flat["model.lr"] == 0.001
    assert flat["model.channels"] == [2, 4] and flat["data.shape"] == [32, 32, 32] and flat["data.strict"] is False
    assert isinstance(flat["data.odd"], str)


def test_lightning_wandb_logger_built_like_the_cli_does_gets_the_group(monkeypatch, tmp_path):
    # LightningCLI passes every wandb.init argument from the YAML, unset ones as None (group=None, job_type=None).
    from lightning.pytorch.loggers import WandbLogger as RealWandbLogger

    from neurofed.lightning_compat import wandb_init_kwargs

    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = RealWandbLogger(project="neurofed", save_dir=str(tmp_path), group=None, job_type=None, name=None)
    group_wandb_runs([logger], run_name="fed1", site_name="ixi")
    init = wandb_init_kwargs(logger)
    assert (init["group"], init["job_type"], init["name"], init["mode"]) == ("fed1", "site", "fed1-ixi", "offline")


# No save_dir: the runs must go where $WANDB_DIR says.
def test_wandb_dir_is_honoured_unless_the_logger_names_its_own(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env"))
    default, own = WandbLogger(anonymous=None), WandbLogger(save_dir=str(tmp_path / "own"))
    group_wandb_runs([default, own], run_name="fed1", site_name="ixi")
    assert wandb_init_kwargs(default)["dir"] == str(tmp_path / "env") and "anonymous" not in wandb_init_kwargs(default)
    assert wandb_init_kwargs(own)["dir"] == str(tmp_path / "own")


def test_a_trainer_built_in_python_logs_its_settings_with_dotted_names(tmp_path):
    from federated.federated_toys import ToyRegressor

    from neurofed.federated import FedAdam, FederatedTrainer
    from neurofed.tracking import run_config

    trainer = FederatedTrainer(rounds=3, strategy=FedAdam(eta=0.05), logger=False, default_root_dir=str(tmp_path))
    config = run_config(trainer, ToyRegressor(), "ixi")
    assert config["trainer.rounds"] == 3 and config["trainer.strategy.eta"] == 0.05
    assert config["trainer.strategy.class_path"].endswith("FedAdam") and config["trainer.federation.num_sites"] == 1
    assert config["model.class_path"].endswith("ToyRegressor") and (config["site.rank"], config["site.name"]) == (0, "ixi")
    assert all("." in key and " " not in key for key in config)


WANDB_YAML = """
trainer:
  logger:
    class_path: lightning.pytorch.loggers.WandbLogger
    init_args:
      project: neurofed
      log_model: true
"""


@pytest.mark.slow
def test_a_simulated_federation_records_what_wandb_users_expect(tmp_path, tiny_sites, monkeypatch):
    pytest.importorskip("wandb")
    from wandb_records import read_run

    from neurofed.federated.simulate import simulate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    config = tmp_path / "wandb.yaml"
    config.write_text(WANDB_YAML)
    in_cwd = set(Path("wandb").glob("offline-run-*"))
    out = io.StringIO()
    code = simulate(
        ["fit", "--config", "configs/federated_demo.yaml", "--config", str(config), "--data.shape", "[32,32,32]",
         "--data.spacing", "4.0", "--data.batch_size", "4", "--trainer.rounds", "2",
         "--model.init_args.channels", "[2,4,4,4,4]", "--trainer.default_root_dir", str(tmp_path / "runs"),
         "--data.cache_dir", str(tmp_path / "cache"), "--trainer.federation.timeout_s", str(scaled(120))],
        [str(root) for root in tiny_sites], out=out,
    )
    console = out.getvalue()
    assert code == 0, console[-3000:]
    rounds = [line for line in console.splitlines() if " round " in line and "pooled val loss" in line]
    assert len(rounds) == 6 and all(len(line) <= 100 for line in rounds), rounds

    assert "anonymous" not in console  # wandb's warning about a setting nobody made
    assert not [line for line in console.splitlines() if "frame #" in line or "[c10d]" in line]
    assert set(Path("wandb").glob("offline-run-*")) == in_cwd  # nothing in the working folder: $WANDB_DIR wins
    runs = {r["name"]: r for r in map(read_run, (tmp_path / "wandb").glob("wandb/offline-run-*/*.wandb"))}
    assert set(runs) == {"demo-ixi", "demo-sald", "demo-camcan"}
    for k, (name, run) in enumerate(sorted(runs.items(), key=lambda item: item[1]["config"]["site.rank"])):
        assert (run["group"], run["job_type"]) == ("demo", "site")
        assert {"trainer.rounds", "trainer.federation.num_sites", "model.class_path", "model.lr", "data.root",
                "data.label", "data.shape", "site.rank", "site.name"} <= set(run["config"])
        # one naming scheme: dotted keys, no spaces, every setting once (no "rounds" beside "trainer.rounds")
        keys = [key for key in run["config"] if not key.startswith("_")]
        assert all("." in key and " " not in key for key in keys), sorted(keys)
        assert run["config"]["trainer.rounds"] == 2 and run["config"]["data.root"].endswith(name.split("-")[1])
        assert run["config"]["site.rank"] == k and run["config"]["site.name"] == name.split("-")[1]
        per_round = [row for row in run["history"] if "val/pooled/loss" in row]
        assert [row["trainer/global_step"] for row in per_round] == [1, 2]
        assert {"train/site/loss", "val/site/mae", "val/pooled/mae", "val/pooled/r"} <= set(per_round[0])
        summary = run["summary"]
        assert summary["best/round"] in (1, 2) and "best/val/pooled/loss" in summary
        assert {"test/pooled/mae", "test/ixi/mae", "test/sald/mae", "test/camcan/mae"} <= set(summary)
        assert summary["test/table/_type"] == "table-file" and summary["test/table/nrows"] == 4  # a wandb.Table
        images = [m for m in run["media"] if m.startswith("media/images/")]
        assert any("scatter" in m for m in images) and any("loss" in m for m in images)
        model = [a for a in run["artifacts"] if a["type"] == "model"]
        assert len(model) == 1 and "best" in model[0]["aliases"] and model[0]["files"] == ["best.ckpt"]

    # Every site keeps its own record, not only site 0.
    for k in range(3):
        site = tmp_path / "runs" / "demo" / f"site-{k}"
        for name in ("config-fit.yaml", "history.json", "test_metrics.json", "loss.png"):
            assert (site / name).is_file(), (k, name)
