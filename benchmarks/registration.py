"""Does registration matter? Accuracy, QC distributions and their counts, for raw-like synthetic scans.

    python benchmarks/registration.py accuracy --raw SYNTH_RAW/sald [--limit 10]
    python benchmarks/registration.py qc --registered SYNTH/ixi --raw SYNTH_RAW/ixi [--limit 10]
    python benchmarks/registration.py time1mm
    python benchmarks/registration.py ants [--scans 4]     # needs `pip install antspyx`

``accuracy`` registers raw-like scans (``neurofed synth --raw``) and compares with the true transform in
``sourcedata/transforms.tsv``: residual rotation (degrees) and translation at the brain centre (mm), and the
Dice of the brain mask carried to MNI space by the estimated vs the true transform. ``qc`` prints the QC
measures per condition (registered, raw without and with registration, flipped, cut-off, skull-on, real
files shipped with nibabel and nilearn) and the counts of scans flagged. Times are process CPU time with
SimpleITK on one thread, plus wall time (on a shared machine, wall time is the noisier of the two).
``ants`` registers the same 1 mm raw-like scans with neurofed and with ANTs (antspyx, the Python build of
``antsRegistration``), as ``antsRegistrationSyNQuick.sh -t a`` would (rigid then affine, mutual information,
its own multi-resolution schedule), both on one thread, and prints time and accuracy side by side: a measured
comparison on the same machine, core and scans, not a figure quoted from elsewhere. ANTs is not a neurofed
dependency; install it into the environment only to run this comparison.
The brain-age MAE with and without registration is ``benchmarks/registration_mae.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from neurofed.data.preprocessing import PreprocessConfig, output_affine, preprocess
from neurofed.data.qc import inspect
from neurofed.data.registration import MNI_BRAIN_CENTRE_MM, estimate_transform, load_reference, sample_on_grid
from neurofed.data.synth.raw import read_transforms

CONFIG = PreprocessConfig()  # 2 mm, 80x96x80, the default data settings


def residual(truth: np.ndarray, estimate: np.ndarray) -> tuple[float, float]:
    """Rotation (degrees) and translation at the brain centre (mm) of truth^-1 o estimate."""
    d = np.linalg.inv(truth) @ estimate
    u, _, vt = np.linalg.svd(d[:3, :3])
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    c = MNI_BRAIN_CENTRE_MM
    return float(angle), float(np.linalg.norm(d[:3, :3] @ c + d[:3, 3] - c))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def accuracy(site: Path, limit: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    truths = read_transforms(site)
    ref = load_reference()
    grid = ref.affine.copy()
    grid[:3, :3] *= 2.0
    shape = tuple(n // 2 for n in ref.t1.shape)
    rows = []
    estimate_transform(*_load(next(iter(truths)), site))  # warm-up: template loading is not per scan
    for rel, truth in list(truths.items())[:limit]:
        data, affine = _load(rel, site)
        t0, c0 = time.perf_counter(), time.process_time()
        est = estimate_transform(data, affine)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        # Brain mask of the scan = template mask carried by the true transform (no elastic part).
        scan_brain = sample_on_grid(ref.mask, ref.affine, np.linalg.inv(truth) @ affine, data.shape) > 0.5
        back_true = sample_on_grid(scan_brain.astype(np.float32), affine, truth @ grid, shape) > 0.5
        back_est = sample_on_grid(scan_brain.astype(np.float32), affine, est @ grid, shape) > 0.5
        rot, trans = residual(truth, est)
        rows.append((rot, trans, dice(back_true, back_est), wall, cpu))
        print(f"{rel:<48} rot {rot:5.2f} deg  trans {trans:5.2f} mm  dice {rows[-1][2]:.4f}  "
              f"wall {wall:5.1f} s  cpu {cpu:5.1f} s")
    a = np.array(rows)
    for name, col in zip(("rotation deg", "translation mm", "dice", "wall s", "cpu s"), a.T):
        print(f"{name:<15} median {np.median(col):.3f}  max {col.max():.3f}  min {col.min():.3f}")


def _load(rel: str, site: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(site / rel))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def time_1mm() -> None:
    """One raw-like scan at 1 mm (220x256x256 mm field of view), registration CPU and wall time."""
    import SimpleITK as sitk

    from neurofed.data.synth.generate import generate_site

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        site = generate_site(tmp, "sald", 2, resolution=1.0, raw=True, progress=False, session_fraction=0)
        truths = read_transforms(site)
        load_reference()
        for rel, truth in truths.items():
            data, affine = _load(rel, site)
            t0, c0 = time.perf_counter(), time.process_time()
            est = estimate_transform(data, affine)
            config = PreprocessConfig(registration="affine")
            t1, c1 = time.perf_counter(), time.process_time()
            preprocess(site / rel, config)
            rot, trans = residual(truth, est)
            print(f"1 mm {data.shape}: register wall {t1 - t0:.1f} s cpu {c1 - c0:.1f} s; whole preprocess "
                  f"(load, register, resample, normalise) wall {time.perf_counter() - t1:.1f} s cpu "
                  f"{time.process_time() - c1:.1f} s; residual {rot:.2f} deg {trans:.2f} mm")


def _ants_to_ras(transform_path: str) -> np.ndarray:
    """An ANTs affine transform file (LPS; fixed -> moving points) as a 4x4 RAS matrix."""
    import ants

    transform = ants.read_transform(transform_path)
    params = np.asarray(transform.parameters, dtype=float)
    matrix, translation = params[:9].reshape(3, 3), params[9:12]
    centre = np.asarray(transform.fixed_parameters, dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def compare_ants(scans: int) -> None:
    """neurofed vs ANTs affine on the same 1 mm raw-like scans, one thread each: time and residuals."""
    import os

    import SimpleITK as sitk

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # read by ANTs' ITK when it starts
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        import ants
    except ImportError:
        sys.exit("the ANTs comparison needs antspyx: pip install antspyx")
    from nilearn.datasets import load_mni152_template

    from neurofed.data.synth.generate import generate_site

    with tempfile.TemporaryDirectory() as tmp:
        template_path = Path(tmp) / "mni152_1mm.nii.gz"
        nib.save(load_mni152_template(resolution=1), str(template_path))
        fixed = ants.image_read(str(template_path))
        site = generate_site(Path(tmp) / "raw", "sald", scans, resolution=1.0, raw=True, progress=False,
                             session_fraction=0)
        truths = read_transforms(site)
        estimate_transform(*_load(next(iter(truths)), site))  # warm-up: template loading is not per scan
        rows = defaultdict(list)
        for rel, truth in truths.items():
            data, affine = _load(rel, site)
            t0, c0 = time.perf_counter(), time.process_time()
            est = estimate_transform(data, affine)
            rows["neurofed (SimpleITK)"].append((*residual(truth, est), time.perf_counter() - t0,
                                                 time.process_time() - c0))
            moving = ants.image_read(str(site / rel))
            t0, c0 = time.perf_counter(), time.process_time()
            result = ants.registration(fixed, moving, type_of_transform="antsRegistrationSyNQuick[a]",
                                       outprefix=str(Path(tmp) / "ants_"))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows["ANTs SyNQuick[a]"].append((*residual(truth, _ants_to_ras(result["fwdtransforms"][0])), wall,
                                             cpu))
            for name, values in rows.items():
                rot, trans, wall, cpu = values[-1]
                print(f"{rel:<44} {name:<22} rot {rot:5.2f} deg  trans {trans:5.2f} mm  wall {wall:5.1f} s  "
                      f"cpu {cpu:5.1f} s", flush=True)
    print(f"\n| method, one thread | scans | median residual rotation (deg) | median residual translation (mm) "
          f"| median wall (s) | median CPU (s) |\n|---|---|---|---|---|---|")
    for name, values in rows.items():
        a = np.array(values)
        print(f"| {name} | {len(a)} | " + " | ".join(f"{np.median(col):.2f} (max {col.max():.2f})" for col in a.T)
              + " |")


def _variants(path: Path, tmp: Path) -> dict[str, Path]:
    """Flipped (A-P, L-R: data mirrored, header kept) and cut-off (top 35 % of slices removed) copies."""
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    out = {}
    for name, array, affine in (
        ("flipped A-P", data[:, ::-1], img.affine),
        ("flipped L-R", data[::-1], img.affine),
        ("cut-off", data[:, :, : int(data.shape[2] * 0.65)], img.affine),
    ):
        target = tmp / f"{name.replace(' ', '_')}_{path.name}"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), str(target))
        out[name] = target
    return out


def _skull_on(path: Path, truth: np.ndarray, tmp: Path) -> Path:
    """A raw-like scan carried into MNI pose by its true transform, without a brain mask."""
    img = nib.load(str(path))
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (96, 116, 110)
    grid[:3, 3] = MNI_BRAIN_CENTRE_MM + np.array([0, 0, -20]) - 2.0 * (np.array(shape) - 1) / 2
    data = sample_on_grid(np.asarray(img.get_fdata(dtype=np.float32)), img.affine, truth @ grid, shape)
    target = tmp / f"skull_{path.name}"
    nib.save(nib.Nifti1Image(data, grid), str(target))
    return target


def real_files() -> dict[str, Path]:
    import nibabel.tests
    import nilearn.datasets

    nib_data = Path(nibabel.tests.__file__).parent / "data"
    nil_data = Path(nilearn.datasets.__file__).parent / "data"
    return {"nibabel anatomical.nii": nib_data / "anatomical.nii",
            "nilearn MNI152 T1 (1 mm)": nil_data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}


def qc_table(registered: list[Path], raw: list[Path], limit: int) -> None:
    from neurofed.data.cache import VolumeCache

    measures: dict[str, list] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = VolumeCache(tmp / "cache")
        cases: list[tuple[str, Path, PreprocessConfig]] = []
        for site in registered:
            for path in sorted(site.glob("sub-*/**/*_T1w.nii.gz"))[:limit]:
                cases.append(("registered", path, CONFIG))
                cases += [(name, p, CONFIG) for name, p in _variants(path, tmp).items()]
        for site in raw:
            truths = read_transforms(site)
            for rel in list(truths)[:limit]:
                cases.append(("raw, registration none", site / rel, CONFIG))
                cases.append(("raw, registration affine", site / rel, PreprocessConfig(registration="affine")))
                cases.append(("skull-on, MNI pose", _skull_on(site / rel, truths[rel], tmp), CONFIG))
        cases += [(name, path, CONFIG) for name, path in real_files().items() if path.is_file()]
        for name, path, config in cases:
            volume = cache.get(path, config)
            t0 = time.process_time()
            result = inspect(volume, output_affine(path, config))
            measures[name].append((result, time.process_time() - t0))
    print(f"{'condition':<26}{'n':>4}{'flagged':>9}  {'ncc':<11}{'ncc L-R':<11}{'ncc A-P':<11}"
          f"{'coverage':<11}{'outside':<11} reasons")
    for name, items in measures.items():
        results = [r for r, _ in items]
        flagged = [r.problems() for r in results if r.problems()]
        reasons = defaultdict(int)
        for p in flagged:
            reasons[p[0]] += 1

        def span(field: str) -> str:
            values = [getattr(r, field) for r in results]
            return f"{min(values):.2f}-{max(values):.2f}"

        print(f"{name:<26}{len(results):>4}{len(flagged):>9}  {span('ncc'):<11}{span('ncc_lr'):<11}"
              f"{span('ncc_ap'):<11}{span('coverage'):<11}{span('outside'):<11} {dict(reasons)}")
    qc_cpu = [t for items in measures.values() for _, t in items]
    print(f"QC CPU time per scan (template on grid cached): median {np.median(qc_cpu) * 1000:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--raw", type=Path, required=True)
    a.add_argument("--limit", type=int, default=10)
    q = sub.add_parser("qc")
    q.add_argument("--registered", type=Path, nargs="+", required=True)
    q.add_argument("--raw", type=Path, nargs="+", required=True)
    q.add_argument("--limit", type=int, default=10)
    sub.add_parser("time1mm")
    a = sub.add_parser("ants")
    a.add_argument("--scans", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "accuracy":
        accuracy(args.raw, args.limit)
    elif args.command == "qc":
        qc_table(args.registered, args.raw, args.limit)
    elif args.command == "ants":
        compare_ants(args.scans)
    else:
        time_1mm()
    return 0


if __name__ == "__main__":
    sys.exit(main())
