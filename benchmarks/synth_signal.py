"""Is there a learnable age / SDMT signal in synthetic sites?

For every site folder under --root, computes one hand-made image feature per scan (share of dark, CSF-like
voxels inside the brain mask: it grows with ventricle enlargement and cortical thinning) and prints its
Pearson correlation with age per site; for MS sites also r(SDMT, age) and r(SDMT, lesion load).
A feature this crude reaching |r| >= 0.5 means a CNN has something real to learn.

    python benchmarks/synth_signal.py --root synth/          # existing sites
    python benchmarks/synth_signal.py --generate 30           # synthesise into a temp dir first
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

from neurofed.data.synth import DEFAULT_SITES, generate_site, read_tsv


def dark_fraction(path: Path) -> float:
    """Share of voxels darker than half the WM level inside a filled, smoothed brain mask."""
    img = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    img = img / max(float(np.percentile(img, 99.5)), 1e-6)
    mask = ndimage.binary_fill_holes(ndimage.gaussian_filter(img, 1.0) > 0.2)
    mask = ndimage.binary_erosion(mask, iterations=1)
    wm = float(np.percentile(img[mask], 90))
    return float((img[mask] < 0.5 * wm).mean())


def _first_scan(site_dir: Path, pid: str) -> Path | None:
    scans = sorted((site_dir / pid).glob("**/anat/*_T1w.nii*"))
    return scans[0] if scans else None


def _r(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), float("nan")
    r, p = stats.pearsonr(x, y)
    return float(r), float(p)


def site_signal(site_dir: Path) -> dict[str, float]:
    rows = read_tsv(site_dir / "participants.tsv")
    feats, ages, sdmt, lesion = [], [], [], []
    for row in rows:
        scan = _first_scan(site_dir, row["participant_id"])  # the first session matches participants.tsv
        if scan is None:
            continue
        feats.append(dark_fraction(scan))
        ages.append(float(row["age"]))
        sdmt.append(float(row["sdmt"]))
        lesion.append(float(row.get("lesion_ml") or "nan"))
    feats, ages, sdmt, lesion = map(np.array, (feats, ages, sdmt, lesion))
    out = {"n": len(feats)}
    out["r_feat_age"], out["p_feat_age"] = _r(feats, ages)
    out["r_sdmt_age"], out["p_sdmt_age"] = _r(sdmt, ages)
    if np.isfinite(lesion).all() and len(lesion):
        out["r_sdmt_lesion"], out["p_sdmt_lesion"] = _r(sdmt, lesion)
    return out


def format_rows(results: dict[str, dict[str, float]]) -> str:
    header = f"{'site':<12}{'n':>5}  {'r(feat,age)':>12} {'p':>9}  {'r(sdmt,age)':>12} {'p':>9}  " \
             f"{'r(sdmt,lesion)':>15} {'p':>9}"
    lines = [header, "-" * len(header)]
    for site, r in results.items():
        les = (f"{r['r_sdmt_lesion']:>15.3f} {r['p_sdmt_lesion']:>9.2g}" if "r_sdmt_lesion" in r
               else f"{'':>15} {'':>9}")
        lines.append(f"{site:<12}{r['n']:>5}  {r['r_feat_age']:>12.3f} {r['p_feat_age']:>9.2g}  "
                     f"{r['r_sdmt_age']:>12.3f} {r['p_sdmt_age']:>9.2g}  {les}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="folder holding one BIDS folder per site")
    parser.add_argument("--generate", type=int, metavar="N",
                        help="first synthesise N subjects per site (healthy and MS sites) into a temp dir")
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.root is None and args.generate is None:
        parser.error("give --root DIR or --generate N")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if args.generate:
            for site in DEFAULT_SITES["healthy"] + DEFAULT_SITES["ms"]:
                generate_site(root, site, args.generate, resolution=args.resolution, seed=args.seed)
        site_dirs = sorted(p.parent for p in root.glob("*/participants.tsv"))
        if not site_dirs:
            print(f"no site folders with participants.tsv under {root}", file=sys.stderr)
            return 1
        results = {d.name: site_signal(d) for d in site_dirs}
    print(format_rows(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
