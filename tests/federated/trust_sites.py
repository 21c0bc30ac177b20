"""Child processes of the trust tests: real sites (toy model), a real store outsider using plain
torch.distributed, and a relay that forwards a genuine site's handshake.

Each writes what happened to ``<out>/<name>.pt``: the error a real site stopped with (type and message, as
the command line would print it) or its final state; for the outsider and the relay, what they did and got.
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
from timeouts import scaled

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
    """Wraps a site's group: the ``at_call``-th sum of ``kind`` it receives is altered on the way in."""

    def __init__(self, inner, at_call: int, kind: str = "parameters") -> None:
        self.inner, self.at_call, self.calls, self.kind = inner, at_call, 0, kind
        self.site_rank, self.num_sites = inner.site_rank, inner.num_sites

    def all_reduce_sum(self, t, kind):
        out = self.inner.all_reduce_sum(t, kind)
        if kind == self.kind:
            self.calls += 1
            if self.calls == self.at_call:
                out = out.clone()
                out[0] += 0.5
        return out

    def all_gather(self, t, kind):
        out = self.inner.all_gather(t, kind)
        if kind == self.kind and self.kind != "parameters":
            self.calls += 1
            if self.calls == self.at_call:
                out = [o.clone() for o in out]
                out[0][1] += 0.5  # another site's row, as this site receives it
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def real_site(rank: int, n: int, port: int, out: str, secret_file: str | None, options: dict) -> None:
    quiet_process()
    if "wait_for" in options:  # imports done; join the moment the file appears
        while not Path(options["wait_for"]).exists():
            time.sleep(0.02)
    L.seed_everything(100 + rank)
    fed = Federation(port=options.get("port", port), site_rank=rank, num_sites=options.get("num_sites", n),
                     timeout_s=options.get("timeout") or scaled(20), secret_file=secret_file,
                     max_update_norm=options.get("max_update_norm"), key_file=options.get("key_file"),
                     roster_file=options.get("roster_file"), **options.get("federation", {}))
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
                                   precise_bn=options.get("precise_bn", True), ema_decay=options.get("ema_decay"),
                                   strategy=options.get("strategy", lambda: None)())
        if "alter_at" in options:
            from neurofed.federated.group import FederationGroup

            trainer.group = AlterReceived(FederationGroup("127.0.0.1", port, rank, n, scaled(20), secret=fed.load_secret()),
                                          *options["alter_at"])
        if options.get("record_wire"):
            from neurofed.federated.group import FederationGroup, RecordingGroup

            trainer.group = RecordingGroup(FederationGroup("127.0.0.1", port, rank, n, scaled(20),
                                                           secret=fed.load_secret()))
        trainer.fit(model, site_data(rank, **options.get("data", {})), ckpt_path=options.get("ckpt_path"))
        result.update(final=state_of(model), history=trainer.history)
        if options.get("record_wire"):
            result["wire"] = [kind for kind, _, _ in trainer.group.sent]
        if options.get("test"):
            result["test"] = trainer.test(model, site_data(rank, **options.get("data", {})))
        trainer.close()
    except FederationError as e:
        result.update(error=type(e).__name__, message=str(e))
    result.update(starts=observed.starts, excluded=observed.excluded, cosines=observed.cosines)
    result["seconds"] = time.monotonic() - started
    torch.save(result, Path(out) / f"site{rank}.pt")


def outsider(port: int, seat: int, out: str) -> None:
    """Without the secret, takes seat ``seat`` before its site arrives: lists the store's keys (TCPStore lets
    anyone), and writes a claim, a size and a heartbeat for that seat under every prefix it finds and under the
    old names, for a few seconds; then it leaves, and ``outsider-done`` tells the real site to come."""
    timeout = timedelta(seconds=scaled(20))
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout, False)
    prefixes = set()
    written = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        prefixes |= {"/".join(k.split("/")[:2]) for k in store.list_keys() if k.startswith("neurofed/")}
        for prefix in prefixes | {"neurofed/pre"}:
            for name, value in (("seat", "mine"), ("size", "2"), ("alive", repr(time.time()))):
                store.set(f"{prefix}/{name}/{seat}", value.encode().rjust(48, b"0"))
                written += 1
        time.sleep(0.2)
    store.add("neurofed/pre/seat/" + str(seat), 1)  # the old protocol's claim, too
    torch.save({"prefixes": sorted(prefixes), "writes": written}, Path(out) / "outsider.pt")
    (Path(out) / "outsider-done").touch()


def relay(real_port: int, fake_port: int, secret_file: str, out: str) -> None:
    """Holds the secret (a leaked one, or another hospital's) but not site 1's key. It takes seat 1 in the real
    federation and, on the path to the genuine site 1 (which reaches it at ``fake_port``), plays seat 0 to it;
    it forwards site 1's genuine hello and signature into the real federation."""
    from neurofed.federated.group import FederationGroup
    from neurofed.federated.handshake import HELLO_BYTES
    from neurofed.federated.identity import SIGNATURE_BYTES
    from neurofed.federated.wire import bytes_tensor

    secret = Path(secret_file).read_bytes().strip()
    got: dict = {}
    try:
        fake = FederationGroup("127.0.0.1", fake_port, 0, 2, timeout_s=scaled(20), secret=secret)  # the genuine site 1 joins
        real = FederationGroup("127.0.0.1", real_port, 1, 2, timeout_s=scaled(20), secret=secret)  # seat 1 of the real one
        hello_1 = fake.all_gather(bytes_tensor(bytes(HELLO_BYTES)), "handshake")[1]         # site 1's genuine hello
        got["real hellos"] = real.all_gather(hello_1, "handshake")                         # forwarded as seat 1's
        signature_1 = fake.all_gather(bytes_tensor(bytes(SIGNATURE_BYTES)), "handshake")[1]
        got["real signatures"] = real.all_gather(signature_1, "handshake")                 # forwarded as well
        fake.all_gather(bytes_tensor(bytes(2)), "handshake")  # verdicts: let both sides finish their step
        got["real verdicts"] = real.all_gather(bytes_tensor(bytes(2)), "handshake")
        got["forwarded"] = True
        for group in (fake, real):
            group.close()
    except Exception as e:  # noqa: BLE001 - recorded for the test
        got["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    torch.save(got, Path(out) / "relay.pt")
