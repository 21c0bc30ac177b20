"""Child processes of the trust tests: real sites (toy model) and a real outsider using plain torch.distributed.

Each writes what happened to ``<out>/<name>.pt``: the error a real site stopped with (type and message, as
the command line would print it) or its final state; for the outsider, every payload it received.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from federated_toys import ToyRegressor, quiet_process, site_data, state_of

from neurofed.federated import FederatedTrainer, Federation
from neurofed.federated.errors import FederationError


class Poison:
    """Round hook: in round ``at`` (0-based) this site's local model becomes NaN, or is scaled by ``scale``."""

    def __init__(self, at: int, kind: str) -> None:
        self.at, self.kind = at, kind

    def on_local_train_end(self, trainer, round, result):
        if round == self.at:
            with torch.no_grad():
                for p in trainer.site.model.parameters():
                    p.copy_(torch.full_like(p, float("nan")) if self.kind == "nan" else p * 1e6)


class AlterUpdate:
    """Round hook: in the rounds of ``plan`` (0-based round -> (factor, entries)) this site sends
    ``global + factor × (local − global)`` over ``"all"`` floating-point entries or the ``"weights"`` only."""

    def __init__(self, plan: dict[int, tuple[float, str]]) -> None:
        self.plan, self.start = plan, {}

    def on_round_start(self, trainer, round):
        self.start = {k: v.detach().clone() for k, v in trainer.site.model.state_dict().items() if v.is_floating_point()}

    def on_local_train_end(self, trainer, round, result):
        if round not in self.plan:
            return
        factor, entries = self.plan[round]
        weights = {name for name, _ in trainer.site.model.named_parameters()}
        with torch.no_grad():
            for k, v in trainer.site.model.state_dict().items():
                if k in self.start and (entries == "all" or k in weights):
                    v.copy_(self.start[k] + factor * (v - self.start[k]))


class KillAt:
    """Round hook: the process dies (SIGKILL, no clean-up) after local training of round ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_local_train_end(self, trainer, round, result):
        if round == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class Observe:
    """Round hook: the global model each round starts from, and who screening left out (and why)."""

    def __init__(self) -> None:
        self.starts, self.excluded, self.cosines = [], [], []

    def on_round_start(self, trainer, round):
        self.starts.append({k: v.detach().clone() for k, v in trainer.site.model.state_dict().items()})

    def on_aggregate_end(self, trainer, round, global_params):
        screening = trainer.screening
        self.excluded.append(dict(screening.excluded) if screening is not None else {})
        self.cosines.append([s.cosine for s in screening.stats] if screening is not None else [])


class AlterReceived:
    """Wraps a site's group: the parameter sum it receives in round ``at`` is altered on the way in."""

    def __init__(self, inner, at_call: int) -> None:
        self.inner, self.at_call, self.calls = inner, at_call, 0
        self.site_rank, self.num_sites = inner.site_rank, inner.num_sites

    def all_reduce_sum(self, t, kind):
        out = self.inner.all_reduce_sum(t, kind)
        if kind == "parameters":
            self.calls += 1
            if self.calls == self.at_call:
                out = out.clone()
                out[0] += 0.5
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def real_site(rank: int, n: int, port: int, out: str, secret_file: str | None, options: dict) -> None:
    quiet_process()
    if "wait_for" in options:  # imports done; join the moment the file appears
        while not Path(options["wait_for"]).exists():
            time.sleep(0.02)
    L.seed_everything(100 + rank)
    fed = Federation(port=port, site_rank=rank, num_sites=options.get("num_sites", n), timeout_s=options.get("timeout", 20),
                     secret_file=secret_file, max_update_norm=options.get("max_update_norm"),
                     **options.get("federation", {}))
    model = ToyRegressor(**options.get("model", {}))
    observed = Observe()
    callbacks = [observed] + ([Poison(*options["poison"])] if "poison" in options else [])
    callbacks += [AlterUpdate(options["alter"])] if "alter" in options else []
    callbacks += [KillAt(options["kill_at"])] if "kill_at" in options else []
    result: dict = {"rank": rank}
    started = time.monotonic()
    try:
        trainer = FederatedTrainer(rounds=options.get("rounds", 2), accelerator="cpu", logger=False,
                                   enable_progress_bar=False, default_root_dir=out, run_name=f"run{rank}",
                                   callbacks=callbacks, federation=fed, seed=options.get("seed", 0),
                                   local_epochs=options.get("local_epochs", 1),
                                   strategy=options.get("strategy", lambda: None)())
        if "alter_at" in options:
            from neurofed.federated.group import FederationGroup

            trainer.group = AlterReceived(FederationGroup("127.0.0.1", port, rank, n, 20), options["alter_at"])
        if options.get("record_wire"):
            from neurofed.federated.group import FederationGroup, RecordingGroup

            trainer.group = RecordingGroup(FederationGroup("127.0.0.1", port, rank, n, 20))
        trainer.fit(model, site_data(rank, **options.get("data", {})), ckpt_path=options.get("ckpt_path"))
        result.update(final=state_of(model), history=trainer.history)
        if options.get("record_wire"):
            result["wire"] = [kind for kind, _, _ in trainer.group.sent]
        trainer.close()
    except FederationError as e:
        result.update(error=type(e).__name__, message=str(e))
    result.update(starts=observed.starts, excluded=observed.excluded, cosines=observed.cosines)
    result["seconds"] = time.monotonic() - started
    torch.save(result, Path(out) / f"site{rank}.pt")


def outsider(port: int, seat: int, n: int, out: str) -> None:
    """Takes seat ``seat`` knowing the protocol but not the secret, then records everything it receives."""
    timeout = timedelta(seconds=20)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout, False)
    store.add(f"neurofed/pre/seat/{seat}", 1)
    store.set(f"neurofed/pre/size/{seat}", str(n))
    store.set(f"neurofed/pre/alive/{seat}", repr(time.time()))
    (Path(out) / "seat-taken").touch()
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    received: list[torch.Tensor] = []
    try:
        pg = dist.ProcessGroupGloo(dist.PrefixStore("federation", store), seat, n, options)
        for size in (64, 32 * n, n):  # hello, tags, verdict: what the handshake exchanges
            mine = torch.randint(0, 255, (size,), dtype=torch.uint8)
            got = [torch.empty_like(mine) for _ in range(n)]
            pg.allgather([got], [mine]).wait()
            received += [g for k, g in enumerate(got) if k != seat]
        claim = torch.tensor([1e9], dtype=torch.float64)  # then claim a billion examples, as in the attack
        pg.allreduce([claim]).wait()
        received.append(claim)
    except RuntimeError as e:
        received.append(torch.tensor([-1.0]))
        (Path(out) / "outsider-error.txt").write_text(str(e).splitlines()[0])
    torch.save(received, Path(out) / "outsider.pt")
