"""Every YAML in configs/ parses against the classes' signatures; the CPU-sized ones run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neurofed.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = ["--data.shape", "[32,32,32]", "--data.spacing", "4.0", "--data.batch_size", "4",
        "--data.num_workers", "0", "--trainer.rounds", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.federation.num_sites", "1"]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"brain_age.yaml", "sdmt_deep.yaml", "sdmt_shallow.yaml", "federated_brain_age.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_against_signatures(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    original = yaml.safe_load(config.read_text())
    # Nothing in the file was silently dropped: every key it sets is in the resolved config.
    for section in ("trainer", "data"):
        for key in original.get(section, {}):
            assert key in resolved[section], f"{config.name}: {section}.{key} was not parsed"
    assert resolved["model"]["class_path"] == original["model"]["class_path"]


def _run(config: str, tmp_path: Path, root: str, *extra: str) -> Path:
    runs = tmp_path / "runs"
    code = main(["fit", "--config", config, *TINY, "--data.root", root, "--data.cache_dir", str(tmp_path / "cache"),
                 "--trainer.default_root_dir", str(runs), *extra])
    assert code == 0
    name = Path(config).stem
    return runs / yaml.safe_load(Path(config).read_text())["trainer"].get("run_name", name) / "site-0" / "best.ckpt"


def test_cpu_configs_run_end_to_end(tmp_path, tiny_bids):
    """brain_age_cpu -> its checkpoint -> sdmt_deep_cpu and sdmt_shallow_cpu; plus the demo federation config."""
    tiny_channels = ["--model.init_args.channels", "[2,2,2,2,2,2]"]
    brain_age = _run(str(REPO / "configs") + "/" + "brain_age_cpu.yaml", tmp_path, str(tiny_bids), *tiny_channels)
    assert brain_age.is_file()
    for config in (str(REPO / "configs") + "/" + "sdmt_deep_cpu.yaml", str(REPO / "configs") + "/" + "sdmt_shallow_cpu.yaml"):
        sdmt = _run(config, tmp_path, str(tiny_bids), "--model.init_args.brain_age_checkpoint", str(brain_age))
        assert sdmt.is_file()
    assert _run(str(REPO / "configs") + "/" + "federated_demo.yaml", tmp_path, str(tiny_bids), *tiny_channels).is_file()


def test_gpu_configs_run_on_cpu_at_tiny_size(tmp_path, tiny_bids):
    """The GPU configs as shipped (resident scans included), with only size, device and compile overridden:
    brain_age -> its checkpoint -> sdmt_deep and sdmt_shallow; federated_brain_age as a federation of one."""
    cpu = ["--trainer.compile", "false"]
    tiny_channels = ["--model.init_args.channels", "[2,2,2,2,2,2]"]
    brain_age = _run(str(REPO / "configs" / "brain_age.yaml"), tmp_path, str(tiny_bids), *cpu, *tiny_channels)
    assert brain_age.is_file()
    for name in ("sdmt_deep.yaml", "sdmt_shallow.yaml"):
        sdmt = _run(str(REPO / "configs" / name), tmp_path, str(tiny_bids), *cpu,
                    "--model.init_args.brain_age_checkpoint", str(brain_age))
        assert sdmt.is_file()
    federated = _run(str(REPO / "configs" / "federated_brain_age.yaml"), tmp_path, str(tiny_bids), *cpu, *tiny_channels)
    assert federated.is_file()
    assert all(yaml.safe_load((REPO / "configs" / n).read_text())["data"]["resident"]
               for n in ("brain_age.yaml", "federated_brain_age.yaml", "sdmt_deep.yaml", "sdmt_shallow.yaml"))
