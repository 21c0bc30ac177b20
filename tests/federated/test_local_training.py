"""The training step never reads a device value back to the host.

On a GPU such a read (``.item()``, ``bool(tensor)``, argument validation in ``torch.distributions``) makes
the host wait for all queued work, so the GPU idles while Python queues the next step. On CPU the same reads
show up as ``aten._local_scalar_dense`` calls, which a dispatch mode can count: this test fails on any of
them in the per-step path (data module hook with resident scans and augmentation, the module's step for
both losses, the FedProx term, backward).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neurofed.data import BrainMRIDataModule
from neurofed.federated import FedProx
from neurofed.models import BrainAgeModule, SDMTModule


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (what ``.item()`` and ``bool()`` dispatch to)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_probe_sees_host_reads():
    flags = torch.tensor([True, False])
    with HostReads() as reads:
        bool(flags.any())
        torch.distributions.Normal(torch.zeros(2), 1.0).cdf(torch.zeros(2))  # validates on the host
    assert reads.count >= 2


@pytest.mark.parametrize("loss", ["kl", "l1"])
def test_a_training_step_reads_nothing_back(tiny_bids, tmp_path, loss):
    dm = BrainMRIDataModule(str(tiny_bids), spacing=4.0, shape=(24, 28, 24), batch_size=4, resident=True,
                            cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    model = BrainAgeModule(channels=[2, 2, 2, 2, 2], loss=loss)
    global_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = iter(dm.train_dataloader())
    dm.on_after_batch_transfer(next(batches), 0)  # fills the resident store: a one-off, not the steady state
    with HostReads() as reads:
        for batch in batches:
            batch = dm.on_after_batch_transfer(batch, 0)
            step_loss = model.training_step(batch, 1) + FedProx(mu=0.1).local_loss(model, global_params)
            step_loss.backward()
    assert reads.count == 0


@pytest.mark.parametrize("transfer", ["deep", "shallow"])
def test_an_sdmt_step_reads_nothing_back(transfer):
    model = SDMTModule(channels=[2, 2, 2, 2, 2], transfer=transfer)
    batch = {"image": torch.randn(4, 1, 24, 28, 24).half(), "target": torch.tensor([40.0, 50.0, 55.0, 60.0])}
    with HostReads() as reads:
        model.training_step(batch, 0).backward()
    assert reads.count == 0
