"""SFCN architecture: the published parameter count, shapes, blocks and channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurofed.models import SFCN


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_parameter_count_matches_original() -> None:
    # The original network: these features + a 1×1×1 conv classifier over 40 age bins (42–82 y).
    backbone = SFCN()
    assert _count(backbone, nn.Conv3d(64, 40, kernel_size=1)) == 2_952_936
    assert _count(backbone, nn.Linear(backbone.out_features, 40)) == 2_952_936


def test_blocks_and_shapes() -> None:
    model = SFCN(in_channels=2, channels=(4, 4, 4, 4, 4, 6), dropout=0.0).eval()
    assert model.out_features == 6
    for i in range(1, 7):
        assert isinstance(getattr(model, f"block{i}"), nn.Sequential)
    kinds = [type(layer) for layer in model.block1]
    assert kinds == [nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ReLU]
    assert model.block6[0].kernel_size == (1, 1, 1)
    out = model(torch.randn(3, 2, 32, 32, 32))
    assert out.shape == (3, 6)
    assert model(torch.randn(1, 2, 40, 48, 40)).shape == (1, 6)


def test_channels_last_gives_same_output() -> None:
    torch.manual_seed(0)
    model = SFCN(channels=(4, 4, 4, 4, 4, 4)).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last_3d)
    assert model.block1[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    got = model(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_too_few_channels() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        SFCN(channels=(8,))


def test_group_norm_variant_has_no_batch_statistics_and_the_same_shapes() -> None:
    from neurofed.models.sfcn import norm_layer

    batch, group = SFCN(1, (8, 16, 4), norm="batch"), SFCN(1, (8, 16, 4), norm="group")
    assert any(isinstance(m, nn.BatchNorm3d) for m in batch.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in group.modules())
    assert [m.num_groups for m in group.modules() if isinstance(m, nn.GroupNorm)] == [1, 2, 1]
    x = torch.randn(3, 1, 16, 16, 16)
    assert group(x).shape == batch(x).shape == (3, 4)
    # each scan is normalised on its own: a scan's features do not depend on the rest of the batch
    group.eval()
    torch.testing.assert_close(group(x)[:1], group(x[:1]))
    assert norm_layer("group", 12).num_groups == 1 and norm_layer("group", 24).num_groups == 3
    with pytest.raises(ValueError, match="norm must be"):
        SFCN(1, (8, 4), norm="layer")


def test_brain_age_module_records_and_restores_the_norm(tmp_path) -> None:
    import lightning as L

    from neurofed.models import BrainAgeModule

    module = BrainAgeModule(channels=(4, 4, 4), norm="group", loss="l1")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    path = tmp_path / "group.ckpt"
    trainer.save_checkpoint(path)
    loaded = BrainAgeModule.load_from_checkpoint(path)
    assert loaded.hparams.norm == "group"
    assert any(isinstance(m, nn.GroupNorm) for m in loaded.modules())
