"""Every aggregation rule against an independent numpy implementation, run at several sites at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threaded_sites import run_rule
from torch import nn

from neurofed.federated.collectives import NoContributionError
from neurofed.federated.params import flatten, float_keys
from neurofed.federated.strategies import (
    ClipUpdates,
    DPFedAvg,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedBN,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    SecureAggregation,
    Strategy,
)

RNG = np.random.default_rng(7)
START = RNG.normal(size=6).astype(np.float32)
# Two rounds at four sites with unequal example counts; in round 2 site 3 was not sampled (weight 0).
PARAMS = [RNG.normal(size=(4, 6)).astype(np.float32), RNG.normal(size=(4, 6)).astype(np.float32)]
COUNTS = [[12.0, 30.0, 7.0, 51.0], [12.0, 30.0, 7.0, 0.0]]


def _run(make) -> list[np.ndarray]:
    """The rule at four sites for both rounds; asserts every site agrees, returns each round's global vector."""
    rounds = [([torch.from_numpy(p) for p in PARAMS[r]], COUNTS[r]) for r in range(2)]
    results = run_rule(make, rounds, torch.from_numpy(START))
    for per_site in results:
        for other in per_site[1:]:
            assert torch.equal(other, per_site[0])
    return [per_site[0].numpy() for per_site in results]


def _mean(params: np.ndarray, weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return (params.astype(np.float64) * w[:, None]).sum(0) / w.sum()


def _fedopt_reference(second_moment, eta=0.05, b1=0.9, b2=0.99, tau=1e-3, bias_correction=False, weighted=True):
    g, m, v, out = START.astype(np.float64), 0.0, 0.0, []
    for t in (1, 2):
        weights = COUNTS[t - 1] if weighted else [float(c > 0) for c in COUNTS[t - 1]]
        delta = _mean(PARAMS[t - 1], weights) - g
        m = b1 * m + (1 - b1) * delta
        v = second_moment(v, delta**2, b2)
        mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        g = g + eta * mh / (np.sqrt(vh) + tau)
        out.append(g)
    return out


ADAM = lambda v, d2, b2: b2 * v + (1 - b2) * d2
YOGI = lambda v, d2, b2: v - (1 - b2) * d2 * np.sign(v - d2)
ADAGRAD = lambda v, d2, b2: v + d2


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("rule", [FedAvg, FedProx, FedBN])
def test_mean_rules_match_numpy(rule, weighted) -> None:
    got = _run(lambda: rule(weighted=weighted))
    for r in range(2):
        weights = COUNTS[r] if weighted else [float(c > 0) for c in COUNTS[r]]
        np.testing.assert_allclose(got[r], _mean(PARAMS[r], weights), rtol=0, atol=2e-7)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize(("rule", "moment"), [(FedAdam, ADAM), (FedYogi, YOGI), (FedAdagrad, ADAGRAD)])
def test_fedopt_family_matches_numpy_over_two_rounds(rule, moment, bias_correction) -> None:
    got = _run(lambda: rule(eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=bias_correction))
    for r, expected in enumerate(_fedopt_reference(moment, bias_correction=bias_correction)):
        np.testing.assert_allclose(got[r], expected, rtol=0, atol=2e-6)


# Flower's FedOpt rules (flwr 1.42, ``flwr/server/strategy/fedadam.py``, ``fedyogi.py``, ``fedadagrad.py``),
# written out from their ``aggregate_fit``: Δ = example-weighted mean − current weights, m = β1·m + (1−β1)·Δ
# from zeros, then the rule's v; FedAdam steps by η·√(1−β2^(r+1))/(1−β1^(r+1)) with r = server_round (from 1)
# and τ on the uncorrected √v; FedYogi and FedAdagrad step by η; FedAdagrad passes β1 = β2 = 0 to FedOpt.
FLOWER = {
    "FedAdam": dict(eta=1e-1, beta_1=0.9, beta_2=0.99, tau=1e-9,
                    v=lambda v, d2, b2: b2 * v + (1 - b2) * d2,
                    eta_r=lambda eta, b1, b2, r: eta * np.sqrt(1 - b2 ** (r + 1.0)) / (1 - b1 ** (r + 1.0))),
    "FedYogi": dict(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3,
                    v=lambda v, d2, b2: v - (1.0 - b2) * d2 * np.sign(v - d2),
                    eta_r=lambda eta, b1, b2, r: eta),
    "FedAdagrad": dict(eta=1e-1, beta_1=0.0, beta_2=0.0, tau=1e-9,
                       v=lambda v, d2, b2: v + d2,
                       eta_r=lambda eta, b1, b2, r: eta),
}
# neurofed's setting for each: Flower's defaults, and what makes the rule Flower's.
FLOWER_COMPATIBLE = {
    "FedAdam": lambda: FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-9, bias_correction="flower"),
    "FedYogi": lambda: FedYogi(eta=0.01, beta1=0.9, beta2=0.99, tau=1e-3),
    "FedAdagrad": lambda: FedAdagrad(eta=0.1, beta1=0.0, tau=1e-9),
}
# Six rounds at three sites whose models stay near the global one, as after a few local steps.
FL_RNG = np.random.default_rng(11)
FL_COUNTS = [[40.0, 25.0, 61.0]] * 6
FL_PARAMS = [(START + 0.05 * FL_RNG.normal(size=(3, 6))).astype(np.float32) for _ in range(6)]


def _flower(name: str) -> list[np.ndarray]:
    f = FLOWER[name]
    weights, m, v, out = START.astype(np.float64), None, None, []
    for server_round, (params, counts) in enumerate(zip(FL_PARAMS, FL_COUNTS), start=1):
        delta = _mean(params, counts) - weights
        m = np.zeros_like(delta) if m is None else m
        v = np.zeros_like(delta) if v is None else v
        m = f["beta_1"] * m + (1 - f["beta_1"]) * delta
        v = f["v"](v, delta * delta, f["beta_2"])
        eta = f["eta_r"](f["eta"], f["beta_1"], f["beta_2"], server_round)
        weights = weights + eta * m / (np.sqrt(v) + f["tau"])
        out.append(weights)
    return out


def _neurofed_rounds(make) -> list[np.ndarray]:
    rounds = [([torch.from_numpy(p) for p in params], counts) for params, counts in zip(FL_PARAMS, FL_COUNTS)]
    results = run_rule(make, rounds, torch.from_numpy(START))
    return [per_site[0].numpy().astype(np.float64) for per_site in results]


def flower_difference(name: str, make=None) -> float:
    """Max abs difference over six rounds between a neurofed rule (default: its Flower setting) and Flower's."""
    got, expected = _neurofed_rounds(make or FLOWER_COMPATIBLE[name]), _flower(name)
    return max(float(np.abs(g - e).max()) for g, e in zip(got, expected))


@pytest.mark.parametrize("name", sorted(FLOWER))
def test_flower_compatible_settings_equal_flowers_rules(name) -> None:
    assert flower_difference(name) < 1e-5  # float32 rounding over six rounds; the global vector is ~1


@pytest.mark.parametrize(("name", "make"), [
    ("FedAdam", lambda: FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-9, bias_correction="adam")),
    ("FedYogi", lambda: FedYogi(eta=0.01, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction="adam")),
    ("FedAdagrad", lambda: FedAdagrad(eta=0.1, tau=1e-9)),
], ids=["adam-correction", "yogi-corrected", "adagrad-momentum"])
def test_other_settings_are_not_flowers(name, make) -> None:
    # what the docstrings used to call Flower's: Adam's moment correction, a corrected Yogi, Adagrad with β1 = 0.9
    assert flower_difference(name, make) > 1e-3


def test_bias_correction_names_its_choices() -> None:
    assert FedAdam(bias_correction=True).bias_correction == "adam" and FedAdam().bias_correction == "none"
    with pytest.raises(ValueError, match="bias_correction must be one of none, adam, flower"):
        FedAdam(bias_correction="kingma")


def test_fedmedian_matches_numpy_and_ignores_unsampled_sites() -> None:
    got = _run(FedMedian)
    np.testing.assert_allclose(got[0], np.median(PARAMS[0], axis=0), rtol=0, atol=1e-7)  # 4 sites: even count
    np.testing.assert_allclose(got[1], np.median(PARAMS[1][:3], axis=0), rtol=0, atol=1e-7)  # site 3 not sampled


def test_no_contribution_is_an_error_not_a_nan_model() -> None:
    rounds = [([torch.from_numpy(p) for p in PARAMS[0][:2]], [0.0, 0.0])]
    for rule in (FedAvg, FedMedian):
        with pytest.raises(NoContributionError, match="round 0"):
            run_rule(rule, rounds, torch.from_numpy(START))


def test_fedadam_state_dict_round_trip_continues_identically() -> None:
    a = FedAdam()
    g = a.server_step(torch.zeros(3), torch.tensor([0.1, -0.2, 0.3]))
    b = FedAdam()
    b.load_state_dict(a.state_dict())
    assert b.step == 1
    mean2 = torch.tensor([0.3, 0.1, -0.4])
    torch.testing.assert_close(a.server_step(g, mean2), b.server_step(g, mean2))
    assert a.state_dict()["step"] == b.state_dict()["step"] == 2
    with pytest.raises(ValueError):
        b.load_state_dict({"moments": 1})


def test_fedprox_loss_and_gradient() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    global_params = {k: v.detach() + torch.randn_like(v) for k, v in model.state_dict().items()}
    mu = 0.5
    loss = FedProx(mu=mu).local_loss(model, global_params)
    expected = sum(((p - global_params[n]) ** 2).sum() for n, p in model.named_parameters()) * mu / 2
    torch.testing.assert_close(loss, expected.detach())
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, mu * (p.detach() - global_params[name]))


def test_fedprox_skips_frozen_parameters_and_rejects_mismatched_names() -> None:
    model = nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    g = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    loss = FedProx(mu=2.0).local_loss(model, g)
    torch.testing.assert_close(loss, (model.weight.detach() ** 2).sum())
    with pytest.raises(ValueError, match="global_params"):
        FedProx().local_loss(model, {"module.weight": torch.zeros(1, 2)})


def _materialized() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1)).eval()
    model(torch.zeros(1, 1, 4, 4, 4))
    return model


def test_base_aggregates_float_entries_but_never_integer_buffers() -> None:
    sd = _materialized().state_dict()
    keys = FedAvg().aggregated_keys(sd)
    assert "1.num_batches_tracked" not in keys
    assert {"0.weight", "1.weight", "1.running_mean", "1.running_var", "4.weight"} <= set(keys)
    assert keys == float_keys(sd)
    assert flatten(sd, keys).numel() == sum(sd[k].numel() for k in keys)


@pytest.mark.parametrize("with_model", [True, False])
def test_fedbn_excludes_every_batchnorm_entry(with_model: bool) -> None:
    model = _materialized()
    sd = model.state_dict()
    keys = FedBN().aggregated_keys(sd, model if with_model else None)
    assert keys == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert not any("num_batches_tracked" in k for k in keys)


def test_fedbn_name_heuristic_without_running_stats() -> None:
    sd = {
        "enc.conv.weight": torch.zeros(2),
        "enc.bn1.weight": torch.zeros(2),
        "enc.bn1.bias": torch.zeros(2),
        "head.weight": torch.zeros(2),
    }
    assert FedBN().aggregated_keys(sd) == ["enc.conv.weight", "head.weight"]


def test_repr_state_and_the_abstract_base() -> None:
    assert repr(FedProx(mu=0.1)) == "FedProx(mu=0.1, weighted=True)"
    assert "eta=0.01" in repr(FedAdam()) and "tau=0.001" in repr(FedAdam())
    assert FedMedian.needs_individual_updates and not FedAvg.needs_individual_updates
    s = FedAvg()
    assert s.state_dict() == {} and s.local_loss(nn.Linear(1, 1), {}) is None
    s.load_state_dict({})
    with pytest.raises(ValueError):
        s.load_state_dict({"m": 1})
    with pytest.raises(TypeError, match="abstract"):
        Strategy()  # a rule without aggregate() cannot be built
    with pytest.raises(ValueError, match="eta"):
        FedYogi(eta=0)


# --------------------------------------------------------------------------------------------------------
# FedAvgM, FedTrimmedAvg, ClipUpdates
# --------------------------------------------------------------------------------------------------------
def test_fedavgm_matches_numpy_over_two_rounds() -> None:
    got = _run(lambda: FedAvgM(server_lr=0.7, momentum=0.9))
    g, v = START.astype(np.float64), 0.0
    for r in range(2):
        v = 0.9 * v + (g - _mean(PARAMS[r], COUNTS[r]))
        g = g - 0.7 * v
        np.testing.assert_allclose(got[r], g, rtol=0, atol=2e-6)


def test_fedavgm_without_momentum_is_fedavg_and_round_trips_its_state() -> None:
    plain, avg = _run(lambda: FedAvgM(server_lr=1.0, momentum=0.0)), _run(FedAvg)
    for r in range(2):
        np.testing.assert_allclose(plain[r], avg[r], rtol=0, atol=1e-6)
    a = FedAvgM()
    g = a.server_step(torch.zeros(3), torch.tensor([0.1, -0.2, 0.3]))
    b = FedAvgM()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.server_step(g, torch.ones(3)), b.server_step(g, torch.ones(3)))
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=1.0)


def _trimmed(values: np.ndarray, beta: float) -> np.ndarray:
    """Independent reference: for each coordinate, drop floor(beta*m) at each end after sorting (at least one
    from three sites when beta > 0), average."""
    m = values.shape[0]
    b = int(np.floor(beta * m))
    b = max(b, 1) if beta > 0 and m >= 3 else b
    out = np.empty(values.shape[1])
    for i in range(values.shape[1]):
        col = sorted(values[:, i].astype(np.float64).tolist())
        kept = col[b: m - b]
        out[i] = sum(kept) / len(kept)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.4])
def test_fedtrimmedavg_matches_numpy_and_ignores_unsampled_sites(beta) -> None:
    got = _run(lambda: FedTrimmedAvg(beta=beta))
    np.testing.assert_allclose(got[0], _trimmed(PARAMS[0], beta), rtol=0, atol=2e-7)
    np.testing.assert_allclose(got[1], _trimmed(PARAMS[1][:3], beta), rtol=0, atol=2e-7)  # site 3 not sampled
    assert FedTrimmedAvg.needs_individual_updates
    with pytest.raises(ValueError, match="beta"):
        FedTrimmedAvg(beta=0.5)


def test_fedtrimmedavg_bounds_an_outlier_site() -> None:
    rounds = [([torch.full((3,), v) for v in (1.0, 1.1, 0.9, 1.05, 1e6)], [1.0] * 5)]
    out = run_rule(lambda: FedTrimmedAvg(beta=0.2), rounds, torch.zeros(3))[0][0]
    torch.testing.assert_close(out, torch.full((3,), (1.0 + 1.05 + 1.1) / 3))


def test_fedtrimmedavg_default_trims_one_site_at_each_end_from_three_sites() -> None:
    assert [FedTrimmedAvg().trimmed(m) for m in range(1, 16)] == [0, 0] + [1] * 7 + [2] * 5 + [3]
    assert FedTrimmedAvg(beta=0.0).trimmed(4) == 0  # beta 0 asks for the plain mean


def _tolerated(rule, m: int) -> int:
    return (m + 1) // 2 - 1 if isinstance(rule, FedMedian) else rule.trimmed(m) if isinstance(rule, FedTrimmedAvg) else 0


@pytest.mark.parametrize("m", [3, 4, 5, 6, 10])
@pytest.mark.parametrize("make", [FedAvg, FedMedian, FedTrimmedAvg], ids=["fedavg", "fedmedian", "fedtrimmedavg"])
@pytest.mark.parametrize("value", [1e6, -1e6, float("inf")])
def test_each_rule_tolerates_exactly_its_documented_number_of_faulty_sites(make, m, value) -> None:
    # Honest sites send values in [1, 2]; the faulty ones send the same extreme value (the worst case: all on one
    # side). With the documented number of faulty sites every coordinate stays within the honest range; with
    # one more, it does not.
    f = _tolerated(make(), m)
    honest = np.random.default_rng(m).uniform(1.0, 2.0, size=(m, 4)).astype(np.float32)
    for faulty, inside in ((f, True), (f + 1, False)):
        params = [torch.from_numpy(honest[k]) if k < m - faulty else torch.full((4,), value) for k in range(m)]
        out = run_rule(make, [(params, [10.0 + k for k in range(m)])], torch.zeros(4))[0][0]
        low, high = honest[: m - faulty].min(0), honest[: m - faulty].max(0)
        within = bool(np.all((out.numpy() >= low) & (out.numpy() <= high)))
        assert within == inside, (make.__name__, m, faulty, out)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_updates_matches_numpy_and_counts_clipped_sites(max_norm) -> None:
    strategies: list[ClipUpdates] = []

    def make():
        strategies.append(ClipUpdates(FedAdam(eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3), max_norm=max_norm))
        return strategies[-1]

    got = _run(make)
    g, m, v = START.astype(np.float64), 0.0, 0.0
    clipped = np.zeros(4)
    for r in range(2):
        sent = []
        for k in range(4):
            u = PARAMS[r][k].astype(np.float64) - g
            norm = np.linalg.norm(u)
            if norm > max_norm:  # the harness sends site 3's vector even unsampled (weight 0)
                u, clipped[k] = u * max_norm / norm, clipped[k] + 1
            sent.append(g + u)
        delta = _mean(np.stack(sent), COUNTS[r]) - g
        m, v = 0.9 * m + 0.1 * delta, 0.99 * v + 0.01 * delta**2
        g = g + 0.05 * m / (np.sqrt(v) + 1e-3)
        np.testing.assert_allclose(got[r], g, rtol=0, atol=2e-6)
    assert [s.clipped_rounds for s in strategies] == clipped.tolist()
    assert (clipped.sum() > 0) == (max_norm < 1)
    metrics = strategies[0].round_metrics()
    assert metrics["clip/clipped_rounds"] == clipped[0] and metrics["clip/update_norm"] > 0


def test_clip_updates_delegates_to_the_inner_rule() -> None:
    wrapped = ClipUpdates(FedMedian(), max_norm=1.0)
    assert wrapped.needs_individual_updates and "max_norm=1.0" in repr(wrapped)
    assert ClipUpdates(FedAdam(), 1.0).state_dict() == FedAdam().state_dict()
    with pytest.raises(ValueError, match="max_norm"):
        ClipUpdates(FedAvg(), max_norm=0)
    with pytest.raises(TypeError, match="Strategy"):
        ClipUpdates("fedavg", max_norm=1.0)


# --------------------------------------------------------------------------------------------------------
# DP-FedAvg
# --------------------------------------------------------------------------------------------------------
def test_dp_fedavg_without_noise_is_the_unweighted_mean_of_clipped_updates() -> None:
    got = _run(lambda: DPFedAvg(FedAvg(), noise_multiplier=0.0, clip_norm=0.8))
    g = START.astype(np.float64)
    for r in range(2):
        active = [k for k in range(4) if COUNTS[r][k] > 0]
        clipped = []
        for k in active:
            u = PARAMS[r][k].astype(np.float64) - g
            clipped.append(u * min(1.0, 0.8 / np.linalg.norm(u)))
        g = g + np.mean(clipped, axis=0)
        np.testing.assert_allclose(got[r], g, rtol=0, atol=2e-6)


def test_dp_fedavg_noise_is_distributed_and_sums_to_sigma_c() -> None:
    """Each sampled site adds N(0, σ²C²/m): over many coordinates the aggregate's noise has std σC/m."""
    n, dim, sigma, c = 4, 20_000, 2.0, 0.5
    start = torch.zeros(dim)
    rounds = [([torch.zeros(dim)] * n, [5.0, 5.0, 5.0, 0.0])]  # 3 sites sampled, no signal
    out = run_rule(lambda: DPFedAvg(FedAvg(), noise_multiplier=sigma, clip_norm=c), rounds, start)
    noise = out[0][0].double().numpy()
    assert abs(noise.std() - sigma * c / 3) < 0.03 * sigma * c / 3 and abs(noise.mean()) < 0.01


def test_dp_fedavg_accounts_each_site_over_the_rounds_it_took_part_in_without_amplification() -> None:
    """Who trains is public (drawn from the seed), so there is no amplification by sampling: each site's ε is
    the RDP accountant's over the rounds it trained in, at q = 1; the accountant is never stepped with q = 0."""
    from opacus.accountants import RDPAccountant

    strategies: list[DPFedAvg] = []

    def make():
        strategies.append(DPFedAvg(FedAvgM(momentum=0.5), noise_multiplier=1.3, clip_norm=1.0, delta=1e-3))
        return strategies[-1]

    _run(make)
    both, once = RDPAccountant(), RDPAccountant()
    both.history, once.history = [(1.3, 1.0, 2)], [(1.3, 1.0, 1)]  # sites 0-2 trained twice, site 3 once
    for k, strategy in enumerate(strategies):
        reference = once if k == 3 else both
        assert strategy.round_metrics()["privacy/site_epsilon"] == pytest.approx(reference.get_epsilon(1e-3), rel=1e-12)
        assert all(q == 1.0 for _, q, _ in strategy.accountant.history)
    assert strategies[0].round_metrics()["privacy/site_delta"] == 1e-3
    restored = DPFedAvg(FedAvgM(momentum=0.5), noise_multiplier=1.3, clip_norm=1.0, delta=1e-3)
    restored.load_state_dict(strategies[0].state_dict())
    assert restored.epsilon == strategies[0].epsilon
    with pytest.raises(ValueError, match="amplification"):  # an old checkpoint's amplified history is refused
        restored.load_state_dict({"inner": strategies[0].inner.state_dict(), "accountant_history": [(1.3, 0.75, 1)]})
    with pytest.raises(ValueError, match="wrap FedAvg"):
        DPFedAvg(FedMedian(), noise_multiplier=1.0, clip_norm=1.0)


@pytest.mark.parametrize("nesting", [
    lambda: DPFedAvg(SecureAggregation(FedAvg()), noise_multiplier=1.0, clip_norm=1.0),
    lambda: ClipUpdates(SecureAggregation(FedAvg()), max_norm=1.0),
    lambda: SecureAggregation(SecureAggregation(FedAvg())),
    lambda: DPFedAvg(DPFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0), noise_multiplier=1.0, clip_norm=1.0),
], ids=["dp-around-secagg", "clip-around-secagg", "secagg-twice", "dp-twice"])
def test_nestings_that_defeat_a_mechanism_are_refused_in_one_line(nesting) -> None:
    with pytest.raises(ValueError, match="outermost|one DPFedAvg") as e:
        nesting()
    assert "\n" not in str(e.value)


def test_dp_around_secure_aggregation_would_have_added_no_noise() -> None:
    """Why the nesting is refused: put together past the check, DPFedAvg(SecureAggregation(FedAvg())) returns
    exactly the un-noised mean (the masked collectives bypass DP-FedAvg's noisy mean) and accounts nothing."""
    made: list[DPFedAvg] = []

    def make():
        outer = DPFedAvg(FedAvg(weighted=False), noise_multiplier=100.0, clip_norm=10.0)
        outer.inner = SecureAggregation(FedAvg(weighted=False))
        made.append(outer)
        return outer

    params = [torch.full((5,), float(k)) for k in range(3)]
    out = run_rule(make, [(params, [1.0, 1.0, 1.0])], torch.zeros(5))[0][0]
    torch.testing.assert_close(out, torch.full((5,), 1.0), atol=1e-9, rtol=0)  # σC = 1000, yet no noise
    assert all(m.accountant.history == [] for m in made)  # and the refused q = 0 step never happens
