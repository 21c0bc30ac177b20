"""The site launcher: one process per root, the right per-site arguments, prefixed output, fail-fast."""

from __future__ import annotations

import argparse
import io
import sys
import textwrap
import time
from pathlib import Path

import pytest
from timeouts import scaled

from neurofed.federated import simulate as sim

ECHO = textwrap.dedent(
    """
    import os, sys, time
    args = sys.argv[1:]
    value = lambda flag: args[args.index(flag) + 1]
    rank = int(value("--trainer.federation.site_rank"))
    print("argv", " ".join(args))
    print("master_port", os.environ["MASTER_PORT"], "local_rank" in {k.lower() for k in os.environ})
    print("tqdm_disable", os.environ.get("TQDM_DISABLE"))
    if "--fail" in args and rank == 2:
        sys.exit(5)  # fails first
    if "--fail" in args and rank == 0:
        time.sleep(1.0)
        sys.exit(3)  # would fail later, with the lowest rank
    if "--fail" in args:
        time.sleep(600)
    """
)

TOY_SITE = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}, {tests!r} + "/.."]
    import lightning as L, torch
    from federated_toys import ToyRegressor, site_data
    from neurofed.federated import Federation, FederatedTrainer
    args = sys.argv[1:]
    value = lambda flag: args[args.index(flag) + 1]
    torch.set_num_threads(1)
    L.seed_everything(0)
    rank = int(value("--trainer.federation.site_rank"))
    fed = Federation(address=value("--trainer.federation.address"), port=int(value("--trainer.federation.port")),
                     site_rank=rank, num_sites=int(value("--trainer.federation.num_sites")), timeout_s={timeout})
    trainer = FederatedTrainer(rounds=2, accelerator="cpu", federation=fed, enable_progress_bar=False,
                               default_root_dir=value("--data.root"), logger=False)
    model = ToyRegressor()
    trainer.fit(model, site_data(rank))
    print("final val loss", trainer.history[-1]["val/pooled/loss"])
    """
)


# The neurofed command, except that sites 1 and 2 take a few seconds longer than site 0 to finish after the
# command (as W&B's sync can): their heartbeats still run while site 0, which hosts the store, is done.
LATE_EXIT = textwrap.dedent(
    """
    import sys, time
    from neurofed.cli import main
    args = sys.argv[1:]
    rank = int(args[args.index("--trainer.federation.site_rank") + 1])
    code = main(args)
    if rank != 0:
        time.sleep(4)
    sys.exit(code)
    """
)

#: What torch prints when a store connection breaks under a collective or a heartbeat.
CPP_NOISE = ("sendBytes", "recvValue", "Broken pipe", "frame #", "Exception raised from", "[c10d]")


def _script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


def test_each_site_gets_its_root_rank_and_own_master_port(tmp_path):
    out = io.StringIO()
    roots = [str(tmp_path / f"root{k}") for k in range(3)]
    code = sim.simulate(["fit", "--config", "c.yaml"], roots, port=29999, entry=_script(tmp_path, "echo.py", ECHO),
                        out=out)
    assert code == 0
    lines = out.getvalue().splitlines()
    for k, root in enumerate(roots):
        argv = next(line for line in lines if line.startswith(f"[site {k}] argv"))
        assert argv.endswith(
            f"fit --config c.yaml --data.root {root} --trainer.federation.site_rank {k} "
            f"--trainer.federation.num_sites 3 --trainer.federation.port 29999 --trainer.federation.address 127.0.0.1"
            " --trainer.enable_progress_bar false"
        )
        assert f"[site {k}] tqdm_disable 1" in lines  # no progress bars in piped site output
        assert next(line for line in lines if line.startswith(f"[site {k}] master_port")).endswith("False")
    ports = {line.split()[3] for line in lines if "master_port" in line}
    assert len(ports) == 3  # every site has its own intra-site DDP port


def test_the_first_site_to_fail_is_named_and_the_others_stopped(tmp_path):
    out = io.StringIO()
    start = time.monotonic()
    code = sim.simulate(["fit", "--fail"], ["a", "b", "c"], entry=_script(tmp_path, "echo.py", ECHO), out=out)
    assert code == sim.FAILED == 2
    assert time.monotonic() - start < scaled(30)  # the others were terminated, not waited for (site 1 sleeps 600 s)
    # Site 2 failed first (at once); site 0, the lowest rank, would have failed a second later.
    assert "[simulate] site 2 failed first (exit code 5)" in out.getvalue()
    assert "site 0 failed" not in out.getvalue()


def test_a_progress_bar_the_user_asks_for_is_kept():
    argv = sim.site_command(["neurofed"], ["fit", "--trainer.enable_progress_bar", "true"], "r", 0, 2, 1, "a")
    assert argv.count("--trainer.enable_progress_bar") == 1


def test_simulate_help_says_a_subcommand_must_follow(capsys):
    from neurofed.cli import main

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "subcommand must follow" in out and "{fit,validate,test,predict}" in out


def test_cli_arguments_pass_the_rest_through(tmp_path):
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    seen = {}
    original = sim.simulate
    sim.simulate = lambda command, roots, port, address: seen.update(command=command, roots=roots, port=port) or 0
    try:
        for argv in (
            ["--roots", "r0,r1", "fit", "--config", "x.yaml", "--port", "1234"],
            ["--roots", "r0", "--roots", "r1", "--port", "1234", "--", "fit", "--config", "x.yaml"],
        ):
            args, rest = parser.parse_known_args(argv)
            args.passthrough = rest
            assert sim.run(args) == 0
            assert seen == {"command": ["fit", "--config", "x.yaml"], "roots": ["r0", "r1"], "port": 1234}, argv
    finally:
        sim.simulate = original


@pytest.mark.slow
def test_simulated_federation_trains_end_to_end(tmp_path):
    tests = str(Path(__file__).parent)
    out = io.StringIO()
    roots = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    code = sim.simulate(["fit"], roots, entry=_script(tmp_path, "site.py", TOY_SITE.format(tests=tests, timeout=scaled(60))), out=out)
    assert code == 0, out.getvalue()[-3000:]
    losses = [line.split()[-1] for line in out.getvalue().splitlines() if "final val loss" in line]
    assert len(losses) == 2 and losses[0] == losses[1]  # pooled validation loss: identical at both sites
    for root in roots:
        assert (Path(root) / "run" / "site-0" / "committed").is_file() or (Path(root) / "run" / "site-1" / "committed").is_file()


@pytest.mark.slow
def test_a_finished_federation_ends_cleanly_when_site_0_finishes_first(tmp_path, tiny_sites):
    out = io.StringIO()
    code = sim.simulate(
        ["fit", "--config", "configs/federated_demo.yaml", "--data.shape", "[32,32,32]", "--data.batch_size", "4",
         "--trainer.rounds", "1", "--model.init_args.channels", "[2,4,4,4,4]", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.cache_dir", str(tmp_path / "cache"),
         "--trainer.federation.timeout_s", str(scaled(120))],
        [str(root) for root in tiny_sites], entry=_script(tmp_path, "late_exit.py", LATE_EXIT), out=out,
    )
    console = out.getvalue()
    assert code == 0, console[-3000:]
    assert all(f"[site {k}] best global model" in console for k in range(3)), console[-3000:]
    noise = [line for line in console.splitlines() if any(mark in line for mark in CPP_NOISE)]
    assert noise == [], noise[:20]
