"""Federation groups over real processes on loopback: results, payload checks, timeouts."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from timeouts import STARTUP_S, scaled

from neurofed.federated.group import FederationGroup, FederationTimeoutError, LocalGroup, RecordingGroup
from neurofed.federated.simulate import free_port as _free_port
from neurofed.federated.wire import FederationPayloadError

#: The peers' timeout_s: every site must start and join within it, so it is stretched on a busy machine.
PEER_TIMEOUT_S = scaled(10)


def _site(port: int, rank: int, n: int, queue, leave_early: bool) -> None:
    try:
        group = FederationGroup("127.0.0.1", port, rank, n, timeout_s=PEER_TIMEOUT_S)
        summed = group.all_reduce_sum(torch.tensor([float(rank + 1), 2.0 * rank], dtype=torch.float64), "loss_sum")
        params = group.all_reduce_sum(torch.full((1000,), float(rank)), "parameters")
        gathered = group.all_gather(torch.tensor([rank, 10 * rank], dtype=torch.int64), "control")
        sent = torch.tensor([42, 7]) if rank == 1 else torch.zeros(2, dtype=torch.int64)
        got = group.broadcast(sent, "control", src=1)
        group.barrier()
        # plain Python values: tensors would travel as shared memory that dies with this process
        result = {
            "summed": (summed.tolist(), str(summed.dtype)),
            "params": params.tolist(),
            "gathered": [g.tolist() for g in gathered],
            "bcast": got.tolist(),
        }
        if leave_early:
            if rank == 0:
                group.stage = "round 3"
                start = time.monotonic()
                try:
                    group.all_reduce_sum(torch.ones(1), "control")
                    result["dead_peer"] = "no error"
                except FederationTimeoutError as e:
                    result["dead_peer"] = (str(e), time.monotonic() - start)
            else:
                queue.put((rank, result))
                return  # exits without joining the last collective
        group.close()
        queue.put((rank, result))
    except Exception as e:  # report to the parent instead of dying silently
        queue.put((rank, repr(e)))


def _run_sites(n: int, leave_early: bool = False) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_site, args=(port, r, n, queue, leave_early)) for r in range(n)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=scaled(STARTUP_S) + 2 * PEER_TIMEOUT_S) for _ in range(n))
    finally:
        for p in procs:
            p.join(timeout=scaled(15))
            if p.is_alive():
                p.kill()
    for rank, res in results.items():
        assert isinstance(res, dict), f"site {rank} failed: {res}"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_collectives_across_processes(n: int) -> None:
    results = _run_sites(n)
    expected_sum = torch.tensor([n * (n + 1) / 2, float(n * (n - 1))], dtype=torch.float64)
    for rank in range(n):
        res = results[rank]
        values, dtype = res["summed"]
        assert dtype == "torch.float64"
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), expected_sum)
        assert res["params"] == [float(n * (n - 1) / 2)] * 1000
        assert res["gathered"] == [[r, 10 * r] for r in range(n)]
        assert res["bcast"] == [42, 7]


@pytest.mark.slow
def test_peer_leaving_mid_round_raises_instead_of_hanging() -> None:
    results = _run_sites(2, leave_early=True)
    outcome = results[0]["dead_peer"]
    assert outcome != "no error"
    message, elapsed = outcome
    assert "site 0 of 2" in message and "127.0.0.1" in message
    assert "site 1 left the federation during round 3" in message  # the survivor names who left, and when
    assert elapsed < PEER_TIMEOUT_S + scaled(5)  # the dead peer is noticed within the timeout


def test_client_without_master_times_out_with_clear_error() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(FederationTimeoutError) as err:
        FederationGroup("127.0.0.1", port, site_rank=1, num_sites=2, timeout_s=2.0)
    assert time.monotonic() - start < 2.0 + scaled(6)
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "site 1 of 2" in msg and "timeout_s=2" in msg


def test_master_waiting_for_missing_site_times_out() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(FederationTimeoutError) as err:
        FederationGroup("127.0.0.1", port, site_rank=0, num_sites=2, timeout_s=2.0)
    assert time.monotonic() - start < 2.0 + scaled(6)
    assert f"127.0.0.1:{port}" in str(err.value) and "site 0 of 2" in str(err.value)


def test_single_site_group_and_payload_checks() -> None:
    group = FederationGroup("127.0.0.1", _free_port(), 0, 1, timeout_s=5.0)
    try:
        x = torch.arange(3, dtype=torch.float64)
        out = group.all_reduce_sum(x, "metric_stats")
        torch.testing.assert_close(out, x)
        out.add_(1)
        assert x.tolist() == [0.0, 1.0, 2.0], "the caller's tensor must not be modified"
        with pytest.raises(FederationPayloadError, match="unknown payload kind"):
            group.all_reduce_sum(x, "predictions")
        with pytest.raises(FederationPayloadError, match="elements"):
            group.all_gather(torch.zeros(17), "loss_sum")
        with pytest.raises(FederationPayloadError):
            group.broadcast([1, 2], "control")  # type: ignore[arg-type]
    finally:
        group.close()
        group.close()


def test_local_group_is_identity_and_checks_payloads() -> None:
    g = LocalGroup()
    x = torch.tensor([1.5, 2.5])
    torch.testing.assert_close(g.all_reduce_sum(x, "loss_sum"), x)
    assert len(g.all_gather(x, "loss_sum")) == 1
    torch.testing.assert_close(g.broadcast(x, "loss_sum"), x)
    g.barrier()
    with pytest.raises(FederationPayloadError):
        g.all_reduce_sum(torch.zeros(100), "example_count")
    with pytest.raises(FederationPayloadError):
        g.all_reduce_sum(torch.zeros(2, dtype=torch.complex64), "loss_sum")


def test_recording_group_records_kind_dtype_shape() -> None:
    g = RecordingGroup(LocalGroup())
    g.all_reduce_sum(torch.zeros(50), "parameters")
    g.all_gather(torch.zeros(7, dtype=torch.float64), "metric_stats")
    g.broadcast(torch.zeros(1, dtype=torch.int64), "control")
    with pytest.raises(FederationPayloadError):
        g.all_reduce_sum(torch.zeros(3), "subject_ids")
    assert g.sent == [
        ("parameters", torch.float32, (50,)),
        ("metric_stats", torch.float64, (7,)),
        ("control", torch.int64, (1,)),
    ]
    assert (g.site_rank, g.num_sites) == (0, 1)


# Sites 0 and 1 of a three-site federation whose site 2 never starts; site 1 joins once site 0 is listening.
NEVER_THREE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from neurofed.federated.group import FederationGroup
    from neurofed.federated.errors import FederationError
    rank, port, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    if rank == 1:
        while not (folder / "imported-0").exists():
            time.sleep(0.05)
    (folder / f"imported-{rank}").touch()
    start = time.monotonic()
    try:
        FederationGroup("127.0.0.1", port, rank, 3, timeout_s=4.0)
    except FederationError as e:
        print(type(e).__name__, e, f"after {time.monotonic() - start:.1f} s")
    """
)


@pytest.mark.slow
def test_a_site_that_never_starts_is_named_by_the_others_without_cpp_noise(tmp_path) -> None:
    script, port = tmp_path / "never_three.py", str(_free_port())
    script.write_text(NEVER_THREE)
    procs = [subprocess.Popen([sys.executable, str(script), str(k), port, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outputs = [p.communicate(timeout=scaled(STARTUP_S + 2 * 4.0 + 60)) for p in procs]
    for k, (out, err) in enumerate(outputs):
        assert out.startswith("FederationTimeoutError") and "site 2 did not join the federation" in out, (k, out, err)
        assert "site 0" not in out.split("within")[0].replace(f"site {k} of 3", ""), out  # site 0 is not blamed
        assert err.strip() == "", err  # no C++ warnings or stack frames from torch's store
