"""ε of a DP-SGD run that crashed and resumed with other settings, against an independent recomputation.

A one-site run (SFCN-GroupNorm on tiny volumes, 16 training scans, batch 4: q = 0.25, 4 steps a round) is
killed when round 3 starts, after committing rounds 1–2 at σ = 0.8, then resumed for rounds 3–4 at σ = 4.0;
a second pair does the same with ``target_epsilon = 3``. For each, it prints the ε the resumed run reports,
the history its last round committed, and ε recomputed independently by Opacus' RDP accountant from that
history (and from the plan: 8 steps at each σ); also what replaying the past steps at the new σ would say.

    python benchmarks/privacy_resume.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "federated"))  # the toy data


class CrashAtRound:
    def __init__(self, at: int) -> None:
        self.at = at

    def on_round_start(self, trainer, round):
        if round == self.at:
            raise KeyboardInterrupt


def run(folder: str, privacy, crash_at=None, ckpt_path=None):
    import lightning as L
    from federated_toys import site_data

    from neurofed.federated import FederatedTrainer
    from neurofed.models import BrainAgeModule

    L.seed_everything(0)
    trainer = FederatedTrainer(rounds=4, privacy=privacy, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=folder, callbacks=[CrashAtRound(crash_at)] if crash_at else [])
    model = BrainAgeModule(channels=(4, 4, 4), norm="group", loss="l1", dropout=0.0, channels_last=False, lr=1e-2)
    try:
        trainer.fit(model, site_data(0, n_train=16, batch_size=4), ckpt_path=ckpt_path)
    except KeyboardInterrupt:
        print(f"  killed at the start of round {crash_at + 1}; rounds committed: {len(trainer.history)}")
    return trainer


def committed_history(folder: str) -> list[tuple]:
    from neurofed.federated.checkpoint_io import load
    from neurofed.federated.commit import committed_rounds, round_dir

    newest = committed_rounds(Path(folder) / "run", 0)[0]
    return [tuple(h) for h in load(round_dir(Path(folder) / "run", 0, newest) / "local.pt")["privacy"]["history"]]


def main() -> None:
    from opacus.accountants import RDPAccountant

    from neurofed.federated import DPSGD

    delta = 1e-3
    for first, second, label in [(DPSGD(noise_multiplier=0.8, delta=delta), DPSGD(noise_multiplier=4.0, delta=delta),
                                  "σ 0.8 for rounds 1-2, resumed at σ 4.0"),
                                 (DPSGD(target_epsilon=3.0, delta=delta), DPSGD(target_epsilon=3.0, delta=delta),
                                  "target_epsilon 3 before and after the crash")]:
        print(label)
        with tempfile.TemporaryDirectory() as folder:
            run(folder, first, crash_at=2)
            resumed = run(folder, second, ckpt_path="last")
            history = committed_history(folder)
            independent = RDPAccountant()
            independent.history = history
            replay = RDPAccountant()
            replay.history = [(history[-1][0], history[-1][1], sum(h[2] for h in history))]
            print(f"  committed accountant history (σ, q, steps): {[(round(s, 4), q, n) for s, q, n in history]}")
            print(f"  ε reported by the resumed run, round 4:     {resumed.history[-1]['privacy/epsilon']:.6f}")
            print(f"  ε recomputed by Opacus' RDP accountant:      {independent.get_epsilon(delta=delta):.6f}")
            print(f"  ε if past steps were replayed at the new σ:  {replay.get_epsilon(delta=delta):.6f}")


if __name__ == "__main__":
    main()
