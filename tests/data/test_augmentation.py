import pytest
import torch

from neurofed.data import GPUAugment


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_changes_images_keeps_shape_and_dtype(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 12, 14, 10).to(dtype)
    out = GPUAugment(max_shift=2)(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert not torch.equal(out, x)
    assert torch.isfinite(out.float()).all()


def test_identity_when_disabled():
    x = torch.randn(2, 1, 8, 8, 8).half()
    assert torch.equal(GPUAugment(enabled=False)(x), x)
    assert torch.equal(GPUAugment(max_shift=0, flip_p=0.0, scale=0.0, offset=0.0)(x), x)


def test_flip_only_is_left_right_mirror_per_sample():
    x = torch.randn(8, 1, 6, 5, 4)
    out = GPUAugment(max_shift=0, flip_p=1.0, scale=0.0, offset=0.0)(x)
    assert torch.equal(out, x.flip(2))


def test_seeded_generator_is_reproducible_and_params_differ_per_sample():
    x = torch.randn(1, 1, 10, 10, 10).repeat(6, 1, 1, 1, 1)
    a = GPUAugment(gamma=0.2, generator=torch.Generator().manual_seed(3))(x)
    b = GPUAugment(gamma=0.2, generator=torch.Generator().manual_seed(3))(x)
    assert torch.equal(a, b)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 6))


def test_shift_moves_content():
    x = torch.zeros(1, 1, 9, 9, 9)
    x[0, 0, 4, 4, 4] = 1.0
    out = GPUAugment(max_shift=2, flip_p=0.0, scale=0.0, offset=0.0,
                     generator=torch.Generator().manual_seed(1))(x)
    assert out.sum() == 1.0
