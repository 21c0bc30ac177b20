"""Throughput of the data pipeline: decode + preprocess every epoch vs reading the cache.

Usage: python benchmarks/data_pipeline.py [--n 16] [--root DIR_WITH_NII_GZ] [--repeats 3]

Without ``--root`` it writes N synthetic 1 mm 182x218x182 float32 ``.nii.gz``
volumes (smooth random texture inside a head-sized ellipsoid) to a temporary
folder. Each volume is preprocessed to 160x192x160 at 1 mm. Reported:
- "decode + preprocess": load_volume + torchio chain, what every epoch would
  cost without a cache;
- "cache read": np.load(mmap) + torch.from_numpy + .float() of the fp16 entry
  (a full read into memory; the page cache is warm after the first pass, as it
  is from the second epoch on).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import zoom

from neurofed.data import PreprocessConfig, VolumeCache, load_volume, preprocess

MNI_1MM_SHAPE = (182, 218, 182)


def write_volumes(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in MNI_1MM_SHAPE], indexing="ij")
    head = (grids[0] / 0.8) ** 2 + (grids[1] / 0.85) ** 2 + (grids[2] / 0.8) ** 2 < 1.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -np.asarray(MNI_1MM_SHAPE) / 2.0
    paths = []
    for i in range(n):
        coarse = rng.normal(size=tuple(s // 8 + 1 for s in MNI_1MM_SHAPE)).astype(np.float32)
        texture = zoom(coarse, [t / c for t, c in zip(MNI_1MM_SHAPE, coarse.shape)], order=1)
        texture = texture[: MNI_1MM_SHAPE[0], : MNI_1MM_SHAPE[1], : MNI_1MM_SHAPE[2]]
        noise = rng.normal(0.0, 0.05, size=MNI_1MM_SHAPE).astype(np.float32)
        volume = (np.where(head, 1.0 + 0.3 * texture, 0.0) + noise).astype(np.float32) * 500.0
        path = folder / f"sub-{i:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), str(path))
        paths.append(path)
    return paths


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="number of volumes to generate")
    parser.add_argument("--root", type=Path, help="folder of .nii.gz volumes to use instead")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the cache (best one reported)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per-worker cost, as in a DataLoader worker
    config = PreprocessConfig(spacing=1.0, shape=(160, 192, 160))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.root:
            paths = sorted(args.root.rglob("*.nii.gz"))[: args.n]
        else:
            start = time.perf_counter()
            paths = write_volumes(tmp, args.n)
            print(f"wrote {len(paths)} volumes in {time.perf_counter() - start:.1f} s")
        if not paths:
            parser.error(f"no .nii.gz files under {args.root}")
        n = len(paths)

        start = time.perf_counter()
        for path in paths:
            load_volume(path)
        decode_s = time.perf_counter() - start

        start = time.perf_counter()
        for path in paths:
            array = preprocess(path, config)
        cold_s = time.perf_counter() - start
        assert array.shape == (1, 160, 192, 160) and array.dtype == np.float16

        cache = VolumeCache(tmp / "cache")
        for path in paths:
            cache.get(path, config)  # fill (untimed)
        files = [cache.path_for(cache.key(p, config)) for p in paths]

        def best_of(read) -> float:
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                for file in files:
                    tensor = read(file)
                best = min(best, time.perf_counter() - start)
            assert tensor.shape == (1, 160, 192, 160)
            return best

        # What CachedVolumeDataset does: fp16 stays fp16 until the GPU.
        fp16_s = best_of(lambda f: torch.from_numpy(np.array(np.load(f, mmap_mode="r"))))
        with warnings.catch_warnings():  # read-only memmap: fine, .float() makes a copy
            warnings.simplefilter("ignore", UserWarning)
            fp32_s = best_of(lambda f: torch.from_numpy(np.load(f, mmap_mode="r")).float())

    cold, warm16, warm32 = rate(n, cold_s), rate(n, fp16_s), rate(n, fp32_s)
    rows = [
        ("decode .nii.gz only", rate(n, decode_s)),
        ("decode + torchio preprocess", cold),
        ("cache read, fp16 tensor (loader path)", warm16),
        ("cache read + .float() on CPU", warm32),
    ]
    print(f"\n{n} volumes {MNI_1MM_SHAPE} float32 .nii.gz -> {config.shape} @ {config.spacing} mm, 1 thread")
    print(f"{'path':40s} {'vol/s':>10s} {'ms/vol':>10s}")
    for name, value in rows:
        print(f"{name:40s} {value:10.1f} {1000.0 / value:10.1f}")
    print(f"{'speed-up, fp16 cache read':40s} {warm16 / cold:10.0f}x")
    print(f"{'speed-up, cache read + .float()':40s} {warm32 / cold:10.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
