"""Training throughput of neurofed's local epoch against a plain PyTorch loop over the same cached data.

Why: The plain-step anchors (README, Benchmarks) time a bare SFCN train step on tensors already in memory. The product adds the data
path (fp16 memmap cache -> DataLoader workers -> pinned memory -> device), GPU-side augmentation in the
datamodule's ``on_after_batch_transfer``, Fabric's wrappers and the round loop. This script measures how
much of the bare step's speed survives, and whether the loader keeps up.

Both variants read the SAME on-disk cache, built once by ``BrainMRIDataModule.prepare_data()`` from
synthetic BIDS volumes written here (no nilearn needed), with the same batch size, workers, pinned memory,
SFCN + soft-label head, AdamW, precision, channels_last_3d and torch.compile settings:

* neurofed: ``FederatedTrainer(rounds=epochs+1, local_epochs=1)`` on a one-site federation; throughput from
  ``trainer.history`` of the rounds after the first (warm-up / compile);
* plain: a hand-written loop over a DataLoader on the same ``CachedVolumeDataset``, with the same GPU
  augmentation (``--no-plain-augment`` to drop it), timed the same way.

Data path (``--data``): ``stream`` reads each batch from the cache through loader workers and pinned memory;
``resident`` holds the site's scans in device memory (``BrainMRIDataModule(resident=True)``; the plain loop
indexes one device tensor); ``both`` runs each variant both ways. The default on CUDA is ``both`` for a
single variant and ``resident`` (plus one streamed pair) for ``--sweep``.

vol/s = trained volumes / training seconds; data-wait % = seconds blocked waiting for the next batch /
training seconds (for neurofed the trainer's ``time/data_wait_s``, n/a when the trainer does not report it).

    python benchmarks/local_epoch.py                                  # CPU, 64^3, width 0.25
    python benchmarks/local_epoch.py --device cuda                    # 160x192x160, full width, bf16+cl
    python benchmarks/local_epoch.py --device cuda --sweep            # the plain-step anchor variants
    python benchmarks/local_epoch.py --data both                      # CPU ratio, streamed and resident
    python benchmarks/local_epoch.py --prepare-only --data-dir /tmp/nf --volumes 64 --subjects 256
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SFCN_CHANNELS = (32, 64, 128, 256, 256, 64)
GPU_SIZE = (160, 192, 160)
CPU_SIZE = (64, 64, 64)

# Plain-step anchors (README, Benchmarks): a bare PyTorch SFCN train step, 160x192x160, one H100 (vol/s, peak GiB).
ANCHORS = {
    "fp32 b8": (54.7, 24.2),
    "bf16 b8": (47.4, 8.8),
    "bf16+cl b8": (118.5, 9.7),
    "bf16+cl+compile b8": (170.2, 8.8),
    "bf16+cl+compile b16": (154.1, 17.5),  # the anchor row is bf16 + compile b16 *without* channels_last
}

DATA_WAIT_BOTTLENECK = 0.15  # above this share of training time spent waiting for data, say so


# ---------------------------------------------------------------------------------------------------------
# Synthetic BIDS sites: cheap volumes, no template, so the GPU image (no nilearn) can write them in seconds
# ---------------------------------------------------------------------------------------------------------
def synth_volume(shape: tuple[int, int, int], age: float, seed: int, contrast: float = 1.0) -> np.ndarray:
    """A head-like int16 volume whose ventricles grow with age: enough structure to train on, ~0.2 s at 1 mm.

    Ellipsoidal brain with low-frequency texture (block-upsampled noise), an age-scaled dark ventricle,
    a bright scalp shell and white noise. The point is realistic *data volume and dtype*, not anatomy.
    """
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z = np.linspace(-1, 1, d, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, h, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, w, dtype=np.float32)[None, None, :]
    s = rng.uniform(0.9, 1.0, 3).astype(np.float32)
    off = rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    r2 = ((z - off[0]) / (0.78 * s[0])) ** 2 + ((y - off[1]) / (0.82 * s[1])) ** 2 + ((x - off[2]) / (0.74 * s[2])) ** 2
    v = 0.10 + 0.0025 * (age - 20.0)  # ventricle half-axis grows ~2.4x from 20 to 90
    vent = (z / (v * 1.6)) ** 2 + (y / (v * 2.2)) ** 2 + (x / v) ** 2 < 1
    block = 8
    low = rng.standard_normal((d // block + 1, h // block + 1, w // block + 1)).astype(np.float32)
    texture = low.repeat(block, 0).repeat(block, 1).repeat(block, 2)[:d, :h, :w]
    img = np.where(r2 < 1, 100.0 + 12.0 * texture, 0.0).astype(np.float32)
    img[(r2 >= 1) & (r2 < 1.18)] = 160.0
    img[vent & (r2 < 1)] = 35.0
    img *= contrast
    img += rng.normal(0.0, 4.0, shape).astype(np.float32)
    return np.clip(img, 0, 32000).astype(np.int16)


def _write_scan(path: str, shape: tuple[int, int, int], age: float, seed: int, contrast: float) -> None:
    import nibabel as nib

    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0  # 1 mm RAS grid centred on the origin
    image = nib.Nifti1Image(synth_volume(shape, age, seed, contrast), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path + ".tmp.nii"
    image.to_filename(tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic site: ``volumes`` distinct scans, listed as ``subjects`` participants (the rest are hard links)."""

    name: str
    volumes: int
    subjects: int
    size: tuple[int, int, int]
    seed: int = 0
    contrast: float = 1.0
    age_range: tuple[float, float] = (20.0, 85.0)


def write_site(root: Path, spec: SiteSpec, workers: int) -> Path:
    """Write a BIDS site once; a second call with the same spec is a no-op.

    Subjects beyond ``spec.volumes`` are hard links to the distinct scans (same content, hence the same cache
    entry), so an epoch can be long enough to time without generating or caching more data. Distinct scans
    are ``sub-0000`` .. in sort order, which lets ``max_subjects=volumes`` fill the cache without redoing
    duplicates.
    """
    site = root / spec.name
    marker = site / ".neurofed-bench.json"
    meta = json.dumps({**spec.__dict__, "size": list(spec.size), "age_range": list(spec.age_range)}, sort_keys=True)
    if marker.is_file() and marker.read_text() == meta:
        return site
    site.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([spec.seed, 7])
    ages = rng.uniform(*spec.age_range, spec.volumes)
    jobs = []
    for i in range(spec.volumes):
        path = site / f"sub-{i:04d}" / "anat" / f"sub-{i:04d}_T1w.nii"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), tuple(spec.size), float(ages[i]), spec.seed * 100_003 + i, spec.contrast))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_scan, *zip(*jobs)))
    else:
        for job in jobs:
            _write_scan(*job)
    rows = [f"sub-{i:04d}\t{ages[i]:.2f}" for i in range(spec.volumes)]
    for j in range(spec.volumes, spec.subjects):
        src = site / f"sub-{j % spec.volumes:04d}" / "anat" / f"sub-{j % spec.volumes:04d}_T1w.nii"
        dst = site / f"sub-{j:04d}" / "anat" / f"sub-{j:04d}_T1w.nii"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
        rows.append(f"sub-{j:04d}\t{ages[j % spec.volumes]:.2f}")
    (site / "participants.tsv").write_text("participant_id\tage\n" + "\n".join(rows) + "\n")
    (site / "dataset_description.json").write_text(json.dumps({"Name": spec.name, "BIDSVersion": "1.9.0"}))
    marker.write_text(meta)
    return site


def make_datamodule(site: Path, cache_dir: Path, size, batch_size: int, num_workers: int, augment: bool = True,
                    max_subjects: int | None = None, resident: bool = False):
    """The product's datamodule at 1 mm on ``size``; most subjects in the training split."""
    from neurofed.data import BrainMRIDataModule

    return BrainMRIDataModule(
        root=str(site), label="age", spacing=1.0, shape=tuple(size), split=(0.8, 0.1, 0.1),
        batch_size=batch_size, num_workers=num_workers, cache_dir=str(cache_dir), augment=augment,
        max_subjects=max_subjects, resident=resident,
    )


def prepare_site(data_dir: Path, spec: SiteSpec, workers: int) -> Path:
    """Write the site and fill the cache once (distinct scans only, ``workers`` processes); returns its root."""
    t0 = time.perf_counter()
    site = write_site(data_dir / "bids", spec, workers)
    t1 = time.perf_counter()
    # Distinct scans only: the hard-linked subjects share their cache entries, found when a loop indexes the site.
    make_datamodule(site, data_dir / "cache", spec.size, 8, workers, max_subjects=spec.volumes).prepare_data()
    t2 = time.perf_counter()
    print(f"data {spec.name}: {spec.volumes} distinct scans as {spec.subjects} subjects, "
          f"{'x'.join(map(str, spec.size))} @ 1 mm; write {t1 - t0:.1f} s, cache {t2 - t1:.1f} s incl. imports "
          f"({workers} workers)", flush=True)
    return site


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    vol_s: float
    wait_share: float  # NaN when unknown
    peak_gib: float
    peak_kind: str
    note: str = ""
    data: str = "stream"
    start_gib: float = 0.0  # GPU memory already allocated when the variant started (resident scans, leftovers)
    warmup_peak_gib: float = math.nan  # peak of the warm-up epoch alone (cuDNN autotuning, compile); GPU only


def scaled_channels(width: float) -> list[int]:
    return [max(1, int(round(c * width))) for c in SFCN_CHANNELS]


def reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated_gib(device: str) -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0


def peak_memory(device: str) -> tuple[float, str]:
    """Peak GPU memory allocated since the last reset, or the process's RSS high-water mark on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"


def fresh_compile_state() -> None:
    """Forget compiled graphs between variants and allow the recompiles of train/eval and the last batch."""
    import torch

    torch._dynamo.reset()
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def steady_peak_hook():
    """A round hook that keeps the warm-up round's peak GPU memory apart from the timed rounds'.

    Why: the first round autotunes cuDNN (trying kernels with large workspaces) and compiles; its transient
    peak says nothing about the memory training needs, which is what a site sizing its batch wants to know.
    """
    import torch

    class SteadyPeak:
        """Round hook: the peak of the warm-up round, then a fresh peak counter for the timed rounds."""

        warmup_peak_gib = math.nan

        def on_round_start(self, trainer, round) -> None:
            if round == 1 and torch.cuda.is_available():
                torch.cuda.synchronize()
                self.warmup_peak_gib = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()

    return SteadyPeak()


def trained_volumes(n_train: int, batch_size: int) -> int:
    """Volumes one epoch trains under the datamodule's drop_last rule."""
    return (n_train // batch_size) * batch_size if n_train > batch_size else n_train


# ---------------------------------------------------------------------------------------------------------
# The two variants
# ---------------------------------------------------------------------------------------------------------
def run_neurofed(dm, args, precision: str, channels_last: bool, compile_: bool, batch_size: int, root: Path) -> Result:
    """One-site FederatedTrainer, ``epochs + 1`` rounds of one local epoch; the first round is warm-up."""
    import torch

    from neurofed.models import BrainAgeModule

    dm.batch_size = batch_size
    reset_peak(args.device)
    start = allocated_gib(args.device)
    fresh_compile_state()
    torch.manual_seed(0)
    model = BrainAgeModule(channels=scaled_channels(args.width), channels_last=channels_last)
    from neurofed.federated import FederatedTrainer

    steady = steady_peak_hook()
    trainer = FederatedTrainer(
        callbacks=[steady], rounds=args.epochs + 1, local_epochs=1, precision=precision, accelerator=args.device,
        compile=compile_, logger=False, enable_progress_bar=False, default_root_dir=str(root), run_name="local-epoch",
    )
    trainer.fit(model, dm)
    trainer.close()
    peak, kind = peak_memory(args.device)
    trainer_warmup_peak = steady.warmup_peak_gib
    measured = trainer.history[1:]
    n_train = len(dm.train_records)
    volumes = sum(h.get("train/site/volumes", trained_volumes(n_train, batch_size)) for h in measured)
    train_s = sum(h["time/train_s"] for h in measured)
    waits = [h.get("time/data_wait_s") for h in measured]
    wait = sum(waits) / train_s if all(w is not None for w in waits) else math.nan
    note = "" if "train/site/volumes" in measured[0] else "volumes from split size"
    if math.isnan(wait):
        note = "; ".join(filter(None, [note, "trainer reports no time/data_wait_s"]))
    del trainer, model
    data = "resident" if dm.resident else "stream"
    return Result("neurofed", volumes / train_s, wait, peak, kind, note, data, start, trainer_warmup_peak)


def run_plain(dm, args, precision: str, channels_last: bool, compile_: bool, batch_size: int, resident: bool) -> Result:
    """A hand-written loop over the same cache: DataLoader -> device -> (augment) -> autocast step -> AdamW.

    ``resident``: the training scans are stacked into one device tensor first and each batch is an index
    into it (a fresh permutation per epoch, same drop-last rule), as ``BrainMRIDataModule(resident=True)`` does.
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from neurofed.data import CachedVolumeDataset, GPUAugment
    from neurofed.models.losses import AgeBins, soft_label_kl
    from neurofed.models.sfcn import SFCN

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    reset_peak(args.device)
    fresh_compile_state()
    torch.manual_seed(0)
    dataset = CachedVolumeDataset(dm.train_records, dm.cache, dm.config, augment=False)
    if resident:
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).to(device)
        targets = torch.stack([dataset[i]["target"] for i in range(len(dataset))]).to(device)
        order = torch.Generator().manual_seed(0)

        def resident_batches():
            perm = torch.randperm(len(dataset), generator=order).to(device)  # one copy per epoch, not per step
            stop = trained_volumes(len(dataset), batch_size)
            for i in range(0, stop, batch_size):
                index = perm[i:i + batch_size]
                yield {"image": images.index_select(0, index), "target": targets.index_select(0, index)}

        loader = None
    else:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
            num_workers=args.num_workers, pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
            drop_last=len(dataset) > batch_size,
        )
    start = allocated_gib(args.device)
    bins = AgeBins()
    centers = bins.centers.to(device)
    backbone = SFCN(1, scaled_channels(args.width), 0.5)
    net = nn.Sequential(backbone, nn.Linear(backbone.out_features, len(bins.centers))).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    step = torch.compile(net) if compile_ else net
    augment = GPUAugment() if args.plain_augment else None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format

    def epoch() -> tuple[float, float, int]:
        net.train()
        wait, seen = 0.0, 0
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        it = resident_batches() if loader is None else iter(loader)
        while True:
            w0 = time.perf_counter()
            batch = next(it, None)
            wait += time.perf_counter() - w0
            if batch is None:
                break
            image = batch["image"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            if augment is not None:
                image = augment(image)
            image = image.to(dtype=torch.float32, memory_format=fmt)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = step(image)
            loss = soft_label_kl(logits.float().log_softmax(-1), target, centers, 1.0)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            seen += image.shape[0]
        loss_sum.item()  # waits for the device, like the trainer's per-round .item()
        return time.perf_counter() - t0, wait, seen

    epoch()  # warm-up / compile
    warmup_peak = math.nan
    if device.type == "cuda":
        torch.cuda.synchronize()
        warmup_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    totals = [epoch() for _ in range(args.epochs)]
    train_s = sum(t for t, _, _ in totals)
    peak, kind = peak_memory(args.device)
    del loader, net, step, optimizer
    if resident:
        del images, targets
    return Result("plain", sum(n for *_, n in totals) / train_s, sum(w for _, w, _ in totals) / train_s, peak, kind,
                  data="resident" if resident else "stream", start_gib=start, warmup_peak_gib=warmup_peak)


def sync_audit(dm, args, root: Path, rounds: int = 2) -> None:
    """Count the operations that make the host wait for the GPU during a short neurofed fit, by source line.

    Why: one such wait per training step (a host read of a device value, a copy from pageable memory)
    empties the GPU's queue, and the GPU then idles while Python queues the next step. Expected ones: a
    few per round (the round's loss, validation sums, aggregation, checkpoints) and one per 50 steps
    (the logged training loss). Anything proportional to the steps is a bug.
    """
    import torch

    from neurofed.federated import FederatedTrainer
    from neurofed.models import BrainAgeModule

    if args.device != "cuda":
        print("sync audit: CUDA only (torch.cuda.set_sync_debug_mode)")
        return
    dm.batch_size = args.batch_size
    model = BrainAgeModule(channels=scaled_channels(args.width), channels_last=args.channels_last)
    trainer = FederatedTrainer(rounds=rounds, local_epochs=1, precision=args.precision, accelerator="cuda",
                               logger=False, enable_progress_bar=False, default_root_dir=str(root), run_name="sync-audit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(model, dm)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    trainer.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    steps = sum(int(h.get("train/site/volumes", 0)) for h in trainer.history) // args.batch_size
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    print(f"sync audit ({'resident' if dm.resident else 'stream'} data, {rounds} rounds, {steps} training steps): "
          f"{len(syncs)} host waits on the GPU, {len(syncs) / max(steps, 1):.2f} per step")
    for key, count in sorted(where.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {count:5d}  {key}")


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------
def fmt_pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def print_table(rows: list[tuple[str, Result]], with_anchor: bool) -> None:
    header = ["variant", "data", "loop", "vol/s", "data-wait %", "peak GiB", "start GiB", "warm-up peak"] + (
        ["anchor vol/s", "vs anchor"] if with_anchor else [])
    body = []
    for label, r in rows:
        cells = [label, r.data, r.name, f"{r.vol_s:.1f}", fmt_pct(r.wait_share), f"{r.peak_gib:.2f} {r.peak_kind}",
                 f"{r.start_gib:.2f}", "-" if math.isnan(r.warmup_peak_gib) else f"{r.warmup_peak_gib:.2f}"]
        if with_anchor:
            anchor = ANCHORS.get(label, (math.nan, math.nan))[0]
            cells += ["-" if math.isnan(anchor) else f"{anchor:.1f}",
                      "-" if math.isnan(anchor) else f"{r.vol_s / anchor:.2f}x"]
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda cells: " | ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])  # noqa: E731
    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for cells in body:
        print(line(cells))


def verdicts(rows: list[tuple[str, Result]]) -> None:
    by_label: dict[tuple[str, str], dict[str, Result]] = {}
    for label, r in rows:
        by_label.setdefault((label, r.data), {})[r.name] = r
    for (label, data), pair in by_label.items():
        if "neurofed" in pair and "plain" in pair:
            print(f"{label} ({data}): neurofed / plain = {pair['neurofed'].vol_s / pair['plain'].vol_s:.2f}")
    for label in dict.fromkeys(label for label, _ in rows):
        modes = {data: pair["neurofed"] for (lab, data), pair in by_label.items() if lab == label and "neurofed" in pair}
        if "stream" in modes and "resident" in modes:
            print(f"{label}: neurofed resident / streamed = {modes['resident'].vol_s / modes['stream'].vol_s:.2f}")
    for label, r in rows:
        for note in filter(None, [r.note]):
            print(f"note ({label}, {r.name}): {note}")
        if not math.isnan(r.wait_share) and r.wait_share > DATA_WAIT_BOTTLENECK:
            print(f"BOTTLENECK ({label}, {r.name}): {100 * r.wait_share:.0f}% of training time is spent waiting "
                  "for the data loader; raise --num-workers or check the disk / page cache")


# ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 3)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default: cpu)")
    p.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="volume shape at 1 mm (default: 64 64 64 on cpu, 160 192 160 on cuda)")
    p.add_argument("--width", type=float, default=None,
                   help="SFCN channel multiplier (default: 0.25 on cpu, 1.0 on cuda)")
    p.add_argument("--batch-size", type=int, default=8, help="volumes per batch (default: 8)")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed"], default=None,
                   help="Fabric precision / autocast dtype (default: 32-true on cpu, bf16-mixed on cuda)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last_3d model and input (default: on for cuda, off for cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes (default: 8 on cuda, 1 on cpu)")
    p.add_argument("--volumes", type=int, default=None,
                   help="distinct synthetic scans written and cached (default: 16 on cpu, 64 on cuda)")
    p.add_argument("--subjects", type=int, default=None,
                   help="participants listed (extra ones hard-link the distinct scans, so epochs are long "
                        "enough to time; default: 4 x volumes); 80%% go to the training split")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch (default: 2)")
    p.add_argument("--sweep", action="store_true",
                   help="run the plain-step anchor variants (fp32 b8; bf16 b8; bf16+cl b8; bf16+cl+compile b8 and b16) "
                        "through neurofed; see --plain for the plain loop")
    p.add_argument("--plain", choices=["all", "best", "none"], default=None,
                   help="which variants also run the plain loop: all, best (bf16+cl b8 and bf16+cl+compile b8 "
                        "in a sweep, the single variant otherwise) or none (default: all without --sweep, best with it)")
    p.add_argument("--plain-augment", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the same GPUAugment in the plain loop (default: on)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark for the plain loop (default: on, as the federated trainer "
                        "sets it on CUDA)")
    p.add_argument("--data", choices=["stream", "resident", "both"], default=None,
                   help="data path: stream from the cache through loader workers, resident scans in device "
                        "memory, or both (default: both; with --sweep on cuda, resident plus one streamed pair)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the synthetic BIDS site and the cache live; reused when present "
                        "(default: a folder under $TMPDIR keyed by size and volume counts)")
    p.add_argument("--prep-workers", type=int, default=os.cpu_count() or 1,
                   help="processes that write and preprocess the synthetic scans (default: all cores)")
    p.add_argument("--prepare-only", action="store_true", help="write the site and fill the cache, then exit")
    p.add_argument("--sync-audit", action="store_true",
                   help="after the variants, count host waits on the GPU in a short neurofed fit, by source line (CUDA)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.size = tuple(args.size or (GPU_SIZE if gpu else CPU_SIZE))
    args.width = args.width if args.width is not None else (1.0 if gpu else 0.25)
    args.precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    args.channels_last = args.channels_last if args.channels_last is not None else gpu
    args.num_workers = args.num_workers if args.num_workers is not None else (8 if gpu else 1)
    args.volumes = args.volumes or (64 if gpu else 16)
    args.subjects = max(args.subjects or 4 * args.volumes, args.volumes)
    args.plain = args.plain or ("best" if args.sweep else "all")
    args.data = args.data or ("resident" if args.sweep and gpu else "both")
    if args.data_dir is None:
        tag = f"{'x'.join(map(str, args.size))}-v{args.volumes}-s{args.subjects}"
        args.data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"neurofed-bench-{tag}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # Under compile, dynamo warns at length about a graph break at Fabric's log_dict `.item()`; one line instead.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    spec = SiteSpec("bench", args.volumes, args.subjects, args.size)
    site = prepare_site(args.data_dir, spec, args.prep_workers)
    if args.prepare_only:
        return

    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device visible")
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    datamodules = {}
    for data in ("stream", "resident"):
        dm = make_datamodule(site, args.data_dir / "cache", args.size, args.batch_size, args.num_workers,
                             resident=data == "resident")
        dm.setup("fit")
        datamodules[data] = dm
    if args.data != "stream":  # fill the store now, so that no variant's timing or peak includes the load
        t0 = time.perf_counter()
        store = datamodules["resident"].volumes
        store.gather(torch.zeros(1, dtype=torch.long, device=args.device))
        print(f"resident scans: {len(store)} distinct, {store.nbytes / 2**30:.2f} GiB on {args.device} "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    n_train = len(datamodules["stream"].train_records)

    if args.sweep:
        variants = [
            ("fp32 b8", "32-true", False, False, 8),
            ("bf16 b8", "bf16-mixed", False, False, 8),
            ("bf16+cl b8", "bf16-mixed", True, False, 8),
            ("bf16+cl+compile b8", "bf16-mixed", True, True, 8),
            ("bf16+cl+compile b16", "bf16-mixed", True, True, 16),
        ]
        best = ("bf16+cl b8", "bf16+cl+compile b8")
        streamed_pair = "bf16+cl b8"  # the loader-bound configuration of the last measurement, for comparison
    else:
        tag = {"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}[args.precision]
        label = tag + ("+cl" if args.channels_last else "") + ("+compile" if args.compile else "") + f" b{args.batch_size}"
        variants = [(label, args.precision, args.channels_last, args.compile, args.batch_size)]
        best = (label,)
        streamed_pair = label

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{device_name}; torch {torch.__version__}; SFCN channels {scaled_channels(args.width)}; "
          f"{'x'.join(map(str, args.size))} fp16 cache; {n_train} training scans ({args.volumes} distinct) per epoch; "
          f"{args.num_workers} loader workers; {args.epochs} timed epochs after 1 warm-up; plain loop "
          f"{'with' if args.plain_augment else 'without'} GPU augmentation", flush=True)

    if any(v[3] for v in variants):
        print("note: under compile, training_step's self.log -> Fabric log_dict -> .item() breaks the graph "
              "(and syncs the device) once per step", flush=True)
    rows: list[tuple[str, Result]] = []
    with tempfile_dir() as root:
        for label, precision, cl, comp, bs in variants:
            t0 = time.perf_counter()
            loops = ["neurofed"] + (["plain"] if args.plain == "all" or (args.plain == "best" and label in best) else [])
            modes = {"both": ["stream", "resident"], "stream": ["stream"], "resident": ["resident"]}[args.data]
            if args.sweep and args.data == "resident" and label == streamed_pair:
                modes = ["stream", "resident"]
            for data in modes:
                for loop in loops:
                    try:
                        if loop == "neurofed":
                            r = run_neurofed(datamodules[data], args, precision, cl, comp, bs, root)
                        else:
                            r = run_plain(datamodules[data], args, precision, cl, comp, bs, data == "resident")
                    except Exception as exc:  # one failing variant must not hide the others
                        print(f"{label} / {data} / {loop}: FAILED: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    rows.append((label, r))
                    print(f"  {label:<22} {data:<8} {loop:<8} {r.vol_s:7.1f} vol/s  data-wait "
                          f"{fmt_pct(r.wait_share):>6}  peak {r.peak_gib:.2f} GiB {r.peak_kind}  "
                          f"(start {r.start_gib:.2f})", flush=True)
            print(f"  ({label}: {time.perf_counter() - t0:.0f} s wall)", flush=True)

        if args.sync_audit:
            sync_audit(datamodules["resident" if args.data != "stream" else "stream"], args, root)

    print()
    print_table(rows, with_anchor=args.device == "cuda" and tuple(args.size) == GPU_SIZE and args.width == 1.0)
    verdicts(rows)
    if args.device == "cpu":
        print("peak is the process's RSS high-water mark (monotone over the run), not per variant")
    else:
        print("peak GiB: timed epochs only; warm-up peak: the first epoch (cuDNN autotuning, compile); start GiB: "
              "memory already allocated when the variant began (resident scans of both loops), so peak - start is "
              "the variant's own training memory")


@contextlib.contextmanager
def tempfile_dir():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="neurofed-local-epoch-") as d:
        yield Path(d)


if __name__ == "__main__":
    main()
