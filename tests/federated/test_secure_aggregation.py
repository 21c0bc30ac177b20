"""Secure aggregation: masks cancel exactly, clipping is counted, what a site sends says nothing of its update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from threaded_sites import ThreadGroup, run_rule

from neurofed.federated import secure_aggregation as sa
from neurofed.federated.strategies import (
    ClipUpdates,
    DPFedAvg,
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    SecureAggregation,
)
from neurofed.federated.wire import FederationPayloadError, check_payload


def _rounds(n: int, dim: int = 257, seed: int = 0, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    start = rng.normal(size=dim).astype(np.float32)
    counts = [float(c) for c in rng.integers(3, 60, size=n)]
    rounds = [([torch.from_numpy(start + scale * rng.normal(size=dim).astype(np.float32)) for _ in range(n)], counts)
              for _ in range(2)]
    return torch.from_numpy(start), rounds


@pytest.mark.parametrize(("n", "neighbours"), [(3, None), (8, None), (8, 4)])
@pytest.mark.parametrize("inner", [FedAvg, lambda: FedAdam(eta=0.05)], ids=["fedavg", "fedadam"])
def test_masked_sum_equals_plain_aggregate_within_quantization(n, neighbours, inner) -> None:
    start, rounds = _rounds(n)
    masked = run_rule(lambda: SecureAggregation(inner(), neighbours=neighbours), rounds, start)
    plain = run_rule(inner, rounds, start)
    codec = sa.FixedPoint(16.0, n)
    for r in range(2):
        for k in range(n):
            assert torch.equal(masked[r][k], masked[r][0])  # every site decodes the same sum
        err = (masked[r][0].double() - plain[r][0].double()).abs().max().item()
        # quantization (n·2^-(f+1) < 1e-12) is far below the float32 rounding of the result: at most one
        # float32 step of the largest value (FedAdam's m/√v can turn a last-bit difference into one step)
        assert err <= 4 * np.spacing(np.float32(plain[r][0].abs().max())), err
    assert codec.max_sum_error() < 1e-12


@pytest.mark.parametrize("n", [3, 8])
def test_masks_cancel_exactly_in_the_modular_sum(n) -> None:
    codec = sa.FixedPoint(4.0, n)
    keys = [sa.SiteKeys() for _ in range(n)]
    publics = [k.public for k in keys]
    shared = [sa.key_exchange(keys[i], publics, i) for i in range(n)]
    rng = np.random.default_rng(1)
    xs = [torch.from_numpy(rng.uniform(-3, 3, size=1000)) for _ in range(n)]
    encoded = [codec.encode(x) for x in xs]
    masked = [sa.mask(encoded[i], shared[i], i, round=5, call=0, modulus_mask=codec.modulus_mask) for i in range(n)]
    plain_sum = sum(torch.from_numpy(e.view(np.int64)) for e in encoded)
    masked_sum = sum(masked)
    # exact: the masked and the unmasked integer sums agree modulo 2^k
    assert torch.equal(codec.decode(masked_sum), codec.decode(plain_sum))
    exact = torch.tensor([math.fsum(float(x[i]) for x in xs) for i in range(1000)], dtype=torch.float64)
    err = (codec.decode(masked_sum) - exact).abs().max().item()
    assert err <= codec.max_sum_error() + np.spacing(3 * n), (err, codec.max_sum_error())
    # and no site's masked vector is its encoding
    assert all(not torch.equal(m, torch.from_numpy(e.view(np.int64))) for m, e in zip(masked, encoded))


def test_values_outside_the_range_are_clipped_and_counted_never_wrapped() -> None:
    n = 3
    start = torch.zeros(5)
    params = [torch.tensor([0.5, 100.0, -100.0, 0.0, 1.0]), torch.zeros(5), torch.zeros(5)]
    strategies: list[SecureAggregation] = []

    def make():
        strategies.append(SecureAggregation(FedAvg(weighted=False), clip_range=2.0))
        return strategies[-1]

    out = run_rule(make, [(params, [1.0] * n)], start)[0][0]
    # site 0's update had two values beyond ±2: they became ±2 (then weighted by 1/3) instead of wrapping to garbage
    torch.testing.assert_close(out, torch.tensor([0.5 / 3, 2 / 3, -2 / 3, 0.0, 1 / 3]))
    assert [s.clipped_values for s in strategies] == [2, 0, 0]
    assert strategies[0].round_metrics()["secagg/clipped_values"] == 2.0
    with pytest.raises(ValueError, match="frac_bits"):
        sa.FixedPoint(2.0**20, 16, frac_bits=50)


@pytest.mark.parametrize("rule", [FedMedian, FedTrimmedAvg])
def test_rules_needing_individual_updates_are_refused(rule) -> None:
    with pytest.raises(ValueError, match=f"SecureAggregation cannot wrap {rule.__name__}.*use a mean-based rule") as e:
        SecureAggregation(rule())
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs every site"):
        SecureAggregation(ClipUpdates(rule(), max_norm=1.0))


def test_what_a_site_sends_is_independent_of_its_update() -> None:
    """Over many runs (fresh keys each), site 0's masked vector is uncorrelated with its true update,
    while its unmasked encoding is perfectly correlated: the statistic can detect a leak."""
    n, dim, draws = 3, 64, 200
    codec = sa.FixedPoint(1.0, n)
    rng = np.random.default_rng(2)
    truth, sent, plain = [], [], []
    for _ in range(draws):
        keys = [sa.SiteKeys() for _ in range(n)]
        shared = sa.key_exchange(keys[0], [k.public for k in keys], 0)
        x = rng.uniform(-1, 1, size=dim)
        enc = codec.encode(torch.from_numpy(x))
        y = sa.mask(enc, shared, 0, round=0, call=0, modulus_mask=codec.modulus_mask).numpy()
        truth.append(x)
        sent.append(y.astype(np.float64))
        plain.append(codec.decode(torch.from_numpy(enc.view(np.int64))).numpy())
    truth, sent, plain = np.concatenate(truth), np.concatenate(sent), np.concatenate(plain)
    r_masked = np.corrcoef(truth, sent)[0, 1]
    r_plain = np.corrcoef(truth, plain)[0, 1]
    # under independence r ~ N(0, 1/N): |r| < 4/√N fails by chance with probability < 1e-4
    assert abs(r_masked) < 4 / np.sqrt(truth.size), r_masked
    assert r_plain > 0.999
    # the sent residues look uniform on [0, 2^k): mean and spread of a uniform distribution
    u = sent / 2.0**codec.bits
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - np.sqrt(1 / 12)) < 0.01


def test_key_exchange_checks_and_the_authentication_seam() -> None:
    keys = [sa.SiteKeys() for _ in range(3)]
    publics = [k.public for k in keys]
    a, b = sa.key_exchange(keys[0], publics, 0), sa.key_exchange(keys[1], publics, 1)
    assert a[1] == b[0] and a[1] != a[2] and len(a[1]) == 32
    seen = []
    sa.key_exchange(keys[0], publics, 0, authenticate=seen.append)
    assert seen == [publics]

    def reject(_):
        raise PermissionError("MAC over the public keys does not verify")

    with pytest.raises(PermissionError, match="MAC"):
        sa.key_exchange(keys[0], publics, 0, authenticate=reject)
    with pytest.raises(ValueError, match="not this site's own"):
        sa.key_exchange(keys[0], [publics[1], publics[1], publics[2]], 0)
    with pytest.raises(ValueError, match="same public key"):
        sa.key_exchange(keys[0], [publics[0], publics[0], publics[2]], 0)
    assert "private" not in repr(keys[0]).lower()


def test_wire_allows_public_keys_and_masked_integers_only_in_their_shapes() -> None:
    check_payload("public_key", torch.zeros(32, dtype=torch.uint8))
    check_payload("masked_parameters", torch.zeros(10_000, dtype=torch.int64))
    for kind, t in [("public_key", torch.zeros(33, dtype=torch.uint8)), ("public_key", torch.zeros(32)),
                    ("masked_parameters", torch.zeros(10)), ("parameters", torch.zeros(10, dtype=torch.int64))]:
        with pytest.raises(FederationPayloadError):
            check_payload(kind, t)


def test_dp_fedavg_under_secure_aggregation_adds_the_same_noise_as_without(monkeypatch) -> None:
    """The masked sum of noised, clipped updates equals the plain one given the same noise, within quantization
    (the noise generator is seeded here from the round and site only to compare two runs)."""
    monkeypatch.setattr(DPFedAvg, "_generator",
                        lambda self, context: torch.Generator().manual_seed(1000 * context.round + context.site_rank))
    start, rounds = _rounds(3, dim=50, scale=1.0)
    make = lambda: DPFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=0.5)
    masked = run_rule(lambda: SecureAggregation(make()), rounds, start)
    plain = run_rule(make, rounds, start)
    for r in range(2):
        assert (masked[r][0] - plain[r][0]).abs().max() <= 4e-7


def test_a_fit_under_secure_aggregation_and_dp_fedavg_records_its_wire_and_budget(tmp_path) -> None:
    import lightning as L
    from federated_toys import ToyRegressor, site_data

    from neurofed.federated import FederatedTrainer
    from neurofed.federated.group import LocalGroup, RecordingGroup

    L.seed_everything(0)
    strategy = SecureAggregation(DPFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, delta=1e-3))
    trainer = FederatedTrainer(rounds=2, strategy=strategy, accelerator="cpu", logger=False,
                               enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.group = RecordingGroup(LocalGroup())
    trainer.fit(ToyRegressor(bn=False), site_data(0))
    kinds = [kind for kind, _, _ in trainer.group.sent]
    assert kinds.count("public_key") == 1 and kinds.count("masked_parameters") == 2
    assert kinds.count("parameters") == 1  # only the starting weights cross in the clear (one broadcast)
    # counts, label statistics, loss and metric sums all cross masked; nothing individual in the clear
    assert not {"label_stats", "example_count", "loss_sum", "metric_stats", "update_norm",
                "update_direction"} & set(kinds)
    assert kinds.count("masked_statistics") == 1 + 2 * 5  # label stats; per round the weight and 4 validation sums
    rows = trainer.history
    assert rows[1]["privacy/site_epsilon"] > rows[0]["privacy/site_epsilon"] > 0
    assert rows[0]["privacy/site_delta"] == 1e-3 and rows[1]["secagg/clipped_values"] == 0


def test_mask_partners_are_a_symmetric_random_graph_that_colluders_cannot_choose() -> None:
    import secrets

    coin = secrets.token_bytes(32)
    for n in (5, 8, 16):
        for r in range(3):
            sets = [sa.mask_partners(i, n, 4, coin, r) for i in range(n)]
            assert all(len(s) == 4 and i not in s for i, s in enumerate(sets))
            assert all((i in sets[j]) == (j in sets[i]) for i in range(n) for j in range(n))
    assert sa.mask_partners(0, 3, 4, coin, 0) == {1, 2}
    # the fixed ring made sites 4 and 6 all of site 5's partners in every round (two colluders unmasked it);
    # drawn at random per round they are so in about 1 round in C(15, 2) = 105
    n, rounds = 16, 300
    both = sum(sa.mask_partners(5, n, 2, coin, r) == {4, 6} for r in range(rounds))
    assert both < rounds / 20, both
    assert sa.mask_partners(5, n, 2, coin, 0) != sa.mask_partners(5, n, 2, b"another coin", 0) or \
        sa.mask_partners(5, n, 2, coin, 1) != sa.mask_partners(5, n, 2, b"another coin", 1)
    with pytest.raises(ValueError, match="even"):
        SecureAggregation(FedAvg(), neighbours=3)


class _SwapsSite1sKeyAtSite0(ThreadGroup):
    """A man in the middle: site 0 receives another public key in site 1's place."""

    def all_gather(self, t, kind):
        out = super().all_gather(t, kind)
        if kind == "public_key" and self.site_rank == 0:
            out[1] = torch.randint(0, 255, (32,), dtype=torch.uint8)
        return out


def test_a_substituted_public_key_is_refused_before_any_mask_is_derived():
    from neurofed.federated.errors import FederationAuthError

    params = [torch.randn(6) for _ in range(3)]
    with pytest.raises(FederationAuthError, match="secure-aggregation keys are not the ones every site signed"):
        run_rule(lambda: SecureAggregation(FedAvg()), [(params, [1.0, 2.0, 3.0])], torch.zeros(6),
                 group_class=_SwapsSite1sKeyAtSite0)
