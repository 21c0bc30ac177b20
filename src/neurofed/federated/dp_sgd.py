"""DP-SGD at each site (Abadi et al. 2016) with Opacus: the patients of a site are protected by (ε, δ).

Every optimizer step clips each example's gradient to L2 norm ``max_grad_norm``, sums, adds Gaussian noise
of standard deviation ``noise_multiplier · max_grad_norm`` and divides by the expected batch size; batches
are drawn by Poisson sampling (each scan independently with probability ``q = batch_size / N``), which is
what the accountant assumes. Opacus' accountant (RDP or PRV) turns (σ, q, steps) into ε at δ; we never
derive ε by hand.

Why these pieces, and why here:

- **BatchNorm is refused.** It mixes the examples of a batch, so one patient's gradient is not bounded by
  clipping. Build SFCN with ``norm="group"`` (``BrainAgeModule(norm="group")``), as Opacus'
  ``ModuleValidator.fix`` would.
- **Hooks on the raw module, before Fabric's setup.** :class:`opacus.GradSampleModule` registers
  per-sample-gradient hooks on the leaf modules, so the LightningModule's own ``training_step`` (called
  through Fabric's wrapper) produces ``p.grad_sample`` as usual; :class:`opacus.optimizers.DPOptimizer`
  wraps the module's optimizer and does the clipping and noise in ``step``.
- **Randomness that no one else can rebuild.** Poisson sampling and the noise draw from generators of
  their own, seeded from ``os.urandom`` before every local pass (:mod:`~neurofed.federated.private_random`),
  never from the run's seed, which every site knows: a site that reran the step on its own data of the
  same size would otherwise obtain the same noise and subtract it. The noise is Opacus' ``secure_mode``
  sum of Gaussians. A private run is therefore not bit-reproducible; everything else about it is.
- **Accounting that survives a crash.** The accountant's history — (σ, q, steps) per segment — is saved in
  every round commit (and in a Lightning checkpoint, by :class:`DPSGDCallback`) and restored as it was; a
  resumed run may change σ or q for its own steps only, and with ``target_epsilon`` it chooses σ for the
  steps that remain so that the whole run stays within the budget.
- **The privacy unit.** An example is a scan. A patient with k scans in the training split is protected by
  group privacy at (k·ε, k·e^((k−1)ε)·δ): reported as ``privacy/patient_epsilon`` when the training data
  names its patients (``records`` with ``participant_id``).
- **Empty batches.** Poisson sampling can draw none; the step still happens (noise only), as Opacus does.

:class:`PrivateSite` is what the federated trainer uses (``FederatedTrainer(privacy=DPSGD(...))``);
:class:`DPSGDCallback` does the same under Lightning's ``Trainer``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from neurofed.federated.private_random import private_generator, reseed_privately

__all__ = ["DPSGD", "PrivateSite", "check_dp_model", "is_empty_batch", "noise_for_budget", "poisson_loader",
           "scans_per_patient", "steps_per_round"]

_EMPTY = "dp_empty_batch"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSGD:
    """Settings of sample-level DP-SGD at every site.

    Give ``noise_multiplier`` σ, or ``target_epsilon`` and let Opacus choose the σ that spends exactly that
    budget over the planned number of steps; with both, σ is used as given and training stops before a
    round that would exceed ``target_epsilon``.

    Attributes:
        max_grad_norm: C, the per-example gradient clipping norm.
        noise_multiplier: σ; the noise on each step's gradient sum has standard deviation σ·C.
        target_epsilon: The budget ε at ``delta``; training stops before a round would exceed it.
        delta: δ, at most about 1/N for N patients at a site.
        accountant: ``"rdp"`` (Rényi DP, Mironov 2017) or ``"prv"`` (privacy random variables, Gopi et al.
            2021, tighter).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self) -> None:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("DPSGD: give noise_multiplier (e.g. 1.0) or target_epsilon (e.g. 8.0)")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"DPSGD: noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"DPSGD: target_epsilon must be > 0, got {self.target_epsilon}")
        if not self.max_grad_norm > 0 or not 0 < self.delta < 1:
            raise ValueError(f"DPSGD: need max_grad_norm > 0 and 0 < delta < 1, got {self.max_grad_norm}, {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"DPSGD: accountant must be 'rdp' or 'prv', got {self.accountant!r}")


def check_dp_model(model: nn.Module) -> None:
    """Raise unless every layer of ``model`` allows per-example gradients (no BatchNorm, nothing Opacus rejects)."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            raise ValueError(  # noqa: TRY004 - a configuration error
                f"DP-SGD: layer {name!r} is {type(module).__name__}, which mixes the examples of a batch so "
                "per-example clipping cannot bound one patient's influence; build the model with GroupNorm "
                "(BrainAgeModule(norm='group') / SFCN(norm='group'))"
            )
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"DP-SGD: Opacus cannot compute per-example gradients of this model: {errors[0]}")


def _collate_or_empty(collate):
    def collate_fn(items):
        return {_EMPTY: torch.ones(1, dtype=torch.bool)} if len(items) == 0 else collate(items)
    return collate_fn


def is_empty_batch(batch: Any) -> bool:
    """Whether Poisson sampling drew no example for this step."""
    return isinstance(batch, dict) and _EMPTY in batch


def poisson_loader(loader: DataLoader) -> DataLoader:
    """``loader``'s dataset and collate function, with Poisson sampling at rate ``batch_size / N``.

    ``1/q`` batches make an epoch, as in Opacus' ``DPDataLoader``; an empty draw yields a marker batch
    (:func:`is_empty_batch`) instead of failing in the collate function. The draws come from a generator of
    the sampler's own, seeded from ``os.urandom`` (and again before every local pass by
    :meth:`PrivateSite.fresh_randomness`): who is in a batch is known to no one, the run's seed included.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise ValueError("DP-SGD needs the training DataLoader with a batch_size (it becomes the expected batch "
                         f"size of Poisson sampling), got {loader!r}")
    n = len(loader.dataset)
    if not loader.batch_size < n:
        raise ValueError(f"DP-SGD: batch_size {loader.batch_size} must be smaller than the {n} training examples "
                         "(the sample rate batch_size / N must be below 1); lower the batch size")
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=loader.batch_size / n,
                                            generator=private_generator())
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=_collate_or_empty(loader.collate_fn),
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def steps_per_round(train_loader: Any, passes: int, local_steps: int | None) -> int:
    """Optimizer steps in one round of local training: ``local_steps``, or ``passes`` Poisson epochs."""
    return local_steps if local_steps is not None else passes * len(train_loader)


def scans_per_patient(dataset: Any) -> int | None:
    """The most training scans any one patient has (``records`` with ``participant_id``), or ``None`` if the
    dataset does not say which scans belong to whom. Counted at the site; it never leaves it."""
    records = getattr(dataset, "records", None)
    if not records or not all(hasattr(r, "participant_id") for r in records):
        return None
    return max(Counter(r.participant_id for r in records).values())


def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     history: list[tuple[float, float, int]], mechanism: str) -> float:
    """The σ whose ``steps`` more steps at ``sample_rate``, after ``history``, keep ε at δ within
    ``target_epsilon`` (to 0.01 below it): Opacus' ``get_noise_multiplier`` for a fresh run, and the same
    bisection on Opacus' accountant with the history in front for a resumed one. Raises when the history
    alone already spends the budget."""
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    if not history:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=int(steps), accountant=mechanism))

    def epsilon(sigma: float) -> float:
        accountant = create_accountant(mechanism)
        accountant.history = [*history, (sigma, sample_rate, int(steps))]
        return float(accountant.get_epsilon(delta=delta))

    low, high, eps_high = 0.0, 10.0, epsilon(10.0)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        eps_high = epsilon(high)
        if high > 1e4:
            raise ValueError(f"DP-SGD: target_epsilon={target_epsilon:g} is already spent by the steps taken "
                             "before this resume; no further step fits in the budget")
    while target_epsilon - eps_high > 0.01:
        mid = (low + high) / 2
        eps = epsilon(mid)
        if eps < target_epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high


def _dp_optimizer_class():
    """Opacus' DPOptimizer, taking a step without any per-example gradient as a step on an empty batch."""
    from opacus.optimizers import DPOptimizer

    class EmptyBatchDPOptimizer(DPOptimizer):
        def pre_step(self, closure=None):
            if all(getattr(p, "grad_sample", None) is None for p in self.params):  # no example was drawn
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            return super().pre_step(closure)

    return EmptyBatchDPOptimizer


class PrivateSite:
    """One site's DP-SGD: per-sample-gradient hooks, the DP optimizer, and the accountant of its ε.

    Args:
        settings: The DP-SGD settings.
        loader: The site's Poisson training loader (:func:`poisson_loader`).
        planned_steps: Optimizer steps this site plans for the whole run (to choose σ from ``target_epsilon``).
        history: The accountant's history of a resumed run, ``[(σ, q, steps), ...]``: restored as it was, and
            σ for the remaining steps is chosen (from ``target_epsilon``) so that the whole run fits.
        scans_per_patient: The most scans one patient has in the training split (``None``: unknown).
    """

    def __init__(self, settings: DPSGD, loader: DataLoader, planned_steps: int,
                 history: list[tuple[float, float, int]] | None = None, scans_per_patient: int | None = None) -> None:
        from opacus.accountants import create_accountant

        self.settings = settings
        self.sample_rate = float(loader.batch_sampler.sample_rate)
        self.expected_batch_size = round(self.sample_rate * len(loader.dataset))
        self.planned_steps = int(planned_steps)
        self.scans_per_patient = scans_per_patient
        self._sampling_generator = getattr(loader.batch_sampler, "generator", None)
        self.accountant = create_accountant(settings.accountant)
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]
        self.noise_multiplier = settings.noise_multiplier
        if self.noise_multiplier is None:
            remaining = max(self.planned_steps - self.steps, 1)
            self.noise_multiplier = noise_for_budget(settings.target_epsilon, settings.delta, self.sample_rate,
                                                     remaining, self.accountant.history, settings.accountant)
        self._hooks: Any = None
        self._optimizer: Any = None

    def resume_from(self, history: list[tuple[float, float, int]]) -> None:
        """Restore the accountant's history of the run being resumed; with ``target_epsilon`` (and no fixed σ),
        choose σ for the steps that remain so that the whole run stays within it."""
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
        if self.settings.noise_multiplier is None:
            remaining = max(self.planned_steps - self.steps, 1)
            self.noise_multiplier = noise_for_budget(self.settings.target_epsilon, self.settings.delta,
                                                     self.sample_rate, remaining, self.history, self.settings.accountant)
        if self._optimizer is not None:
            self._optimizer.noise_multiplier = self.noise_multiplier

    def attach_hooks(self, model: nn.Module) -> None:
        """Per-sample-gradient hooks on ``model``: call it on the raw module, before Fabric's ``setup_module``."""
        from opacus import GradSampleModule

        check_dp_model(model)
        for module in model.modules():  # in-place activations would overwrite what Opacus' backward hooks need
            if getattr(module, "inplace", False) is True:
                module.inplace = False  # same values, one more buffer
        self._hooks = GradSampleModule(model, loss_reduction="mean")  # registers hooks on model's layers

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The DP optimizer around ``optimizer``: clipping and noise in ``step``, each step counted by the accountant.

        The noise comes from a generator on the parameters' device seeded from ``os.urandom``, drawn as
        Opacus' ``secure_mode`` sum of Gaussians.
        """
        if self._hooks is None:
            raise RuntimeError("PrivateSite: call attach_hooks(model) before wrap_optimizer")
        device = next((p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))
        dp = _dp_optimizer_class()(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.settings.max_grad_norm,
                                   expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                                   generator=private_generator(device), secure_mode=True)
        dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self._optimizer = dp
        return dp

    def fresh_randomness(self) -> None:
        """Seed the sampling and noise generators afresh from ``os.urandom`` (before each local pass)."""
        for generator in (self._sampling_generator, getattr(self._optimizer, "generator", None)):
            if isinstance(generator, torch.Generator):
                reseed_privately(generator)

    @staticmethod
    def empty_step(optimizer: Any) -> None:
        """A step on an empty Poisson batch: no example, so the update is the noise alone (as in Opacus)."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history: ``(σ, q, steps)`` per segment, oldest first."""
        return [tuple(h) for h in self.accountant.history]

    @property
    def steps(self) -> int:
        """Noisy steps accounted so far (this run and the runs it resumed)."""
        return sum(h[2] for h in self.accountant.history)

    def epsilon(self, extra_steps: int = 0) -> float:
        """ε at δ after the steps taken (plus ``extra_steps`` more at the current σ and q); ∞ without noise."""
        if self.noise_multiplier == 0 or any(h[0] == 0 for h in self.accountant.history):
            return math.inf
        accountant = self.accountant
        if extra_steps:
            accountant = copy.deepcopy(accountant)
            accountant.history.append((self.noise_multiplier, self.sample_rate, int(extra_steps)))
        if not accountant.history:
            return 0.0
        return float(accountant.get_epsilon(delta=self.settings.delta))

    def would_exceed(self, steps_next_round: int) -> bool:
        """Whether one more round of ``steps_next_round`` steps would spend more than ``target_epsilon``."""
        target = self.settings.target_epsilon
        return target is not None and self.epsilon(steps_next_round) > target * (1 + 1e-6)

    def federation_budget_spent(self, link: Any, steps_next_round: int) -> bool:
        """Whether the federation must stop: one more round would exceed ``target_epsilon`` at some site.

        Sites spend at different rates (different N), so the decision is agreed by one small sum of each
        site's flag (``"control"``, masked under secure aggregation); every site then stops after the same round.
        """
        if self.settings.target_epsilon is None:
            return False
        flag = torch.tensor([float(self.would_exceed(steps_next_round))], dtype=torch.float64)
        stop = link.sum_statistics(flag, "control").item() > 0.5
        if stop:
            log.info("DP-SGD: stopping; one more round would exceed target_epsilon=%g at some site (ε here %.4g)",
                     self.settings.target_epsilon, self.epsilon())
        return stop

    def metrics(self) -> dict[str, float]:
        """ε and δ per scan (and per patient where known), and the σ and q they come from, for the round's metrics."""
        eps, delta = self.epsilon(), self.settings.delta
        out = {"privacy/epsilon": eps, "privacy/delta": delta,
               "privacy/noise_multiplier": float(self.noise_multiplier), "privacy/sample_rate": self.sample_rate}
        k = self.scans_per_patient
        if k is not None:  # group privacy over the k scans of one patient
            out |= {"privacy/scans_per_patient": float(k), "privacy/patient_epsilon": k * eps,
                    "privacy/patient_delta": k * math.exp(min((k - 1) * eps, 700.0)) * delta}
        return out

    def state_dict(self) -> dict[str, Any]:
        """The accountant's history (what a resume restores) and the σ in use."""
        return {"history": self.history, "noise_multiplier": float(self.noise_multiplier)}
