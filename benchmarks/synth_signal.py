"""Is there a learnable age / SDMT signal in synthetic sites, and how much?

Healthy and MS sites: one hand-made image feature per scan (share of dark, CSF-like voxels inside the brain
mask: it grows with ventricle enlargement and cortical thinning) and its Pearson r with age per site; for
MS sites also r(SDMT, age) and r(SDMT, lesion load). A feature this crude reaching |r| >= 0.5 means a CNN
has something real to learn.

MS sites, the ceiling and the floor of the SDMT task, all held-out (k-fold by subject, ridge on
standardised inputs):
  oracle      linear model on the true simulated variables (sourcedata/latents.tsv): age, sex, log lesion
              load, thalamic loss, atrophy gap, disease duration. Education and noise stay unexplained.
  image       linear model on three image features of the models' own 4 mm input (``image_features.py``:
              ventricle darkening, thalamic darkening, lesion burden; the lesion reference from the training
              folds only).
  mean        predict the training folds' mean SDMT.
A last row gives the oracle on 20,000 drawn MS subjects (latents only, no images): the ceiling without
small-sample noise.

    python benchmarks/synth_signal.py --root synth/          # existing sites
    python benchmarks/synth_signal.py --generate 30           # synthesise into a temp dir first
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

import image_features  # noqa: E402  (benchmarks/ is not a package)

from neurofed.data.preprocessing import PreprocessConfig, output_affine, preprocess  # noqa: E402
from neurofed.data.synth import DEFAULT_SITES, generate_site, read_tsv  # noqa: E402

ORACLE_COLUMNS = ("age", "log_lesion", "thalamic_loss", "atrophy_gap", "disease_duration", "female")
FOLDS = 5
RIDGE = 1.0


def _normalised(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Image scaled to its 99.5th percentile, a filled brain mask, and the WM level inside it."""
    img = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    img = img / max(float(np.percentile(img, 99.5)), 1e-6)
    mask = ndimage.binary_fill_holes(ndimage.gaussian_filter(img, 1.0) > 0.2)
    mask = ndimage.binary_erosion(mask, iterations=1)
    return img, mask, float(np.percentile(img[mask], 90))


def dark_fraction(path: Path) -> float:
    """Share of voxels darker than half the WM level inside a filled, smoothed brain mask."""
    img, mask, wm = _normalised(path)
    return float((img[mask] < 0.5 * wm).mean())


#: The SDMT models' input (``benchmarks/replication.py``'s CPU size): the image features are read from it.
MODEL_INPUT = PreprocessConfig(spacing=4.0, shape=(48, 56, 48))


def template_image(path: Path) -> np.ndarray:
    """The scan preprocessed as the models see it, then normalised and aligned onto the feature grid."""
    return image_features.template_space(preprocess(path, MODEL_INPUT), output_affine(path, MODEL_INPUT))


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


def heldout_predictions(x: np.ndarray | Callable[[np.ndarray], np.ndarray], y: np.ndarray, folds: int = FOLDS,
                        seed: int = 0) -> np.ndarray:
    """k-fold held-out predictions of a ridge fit on standardised columns (an empty x gives the mean).

    ``x`` may be a function of the training rows' indices returning every row's predictors, for features
    with a part fitted on the training folds.
    """
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    features = x if callable(x) else (lambda train: x)
    for k in range(min(folds, n)):
        test = order[k::min(folds, n)]
        train = np.setdiff1d(order, test)
        x = features(train)
        mu_y = y[train].mean()
        if x.shape[1] == 0:
            pred[test] = mu_y
            continue
        mu, sd = x[train].mean(0), x[train].std(0)
        sd[sd == 0] = 1.0
        z = (x[train] - mu) / sd
        beta = np.linalg.solve(z.T @ z + RIDGE * np.eye(z.shape[1]), z.T @ (y[train] - mu_y))
        pred[test] = mu_y + ((x[test] - mu) / sd) @ beta
    return pred


def _scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    return float(1.0 - np.mean((y - pred) ** 2) / np.var(y)), float(np.mean(np.abs(y - pred)))


def _oracle_matrix(rows: list[dict[str, float]]) -> np.ndarray:
    return np.array([[r[c] for c in ORACLE_COLUMNS] for r in rows], dtype=np.float64)


def ms_ceiling(site_dir: Path) -> dict[str, float] | None:
    """Held-out oracle, image-feature and mean SDMT predictions of an MS site (None when not MS)."""
    latents_path = site_dir / "sourcedata" / "latents.tsv"
    if not latents_path.exists():
        return None
    first: dict[str, dict[str, float]] = {}
    for row in read_tsv(latents_path):
        if row["participant_id"] in first or float(row["lesion_ml"]) <= 0:
            continue
        first[row["participant_id"]] = {
            "age": float(row["age"]), "log_lesion": float(np.log(float(row["lesion_ml"]))),
            "thalamic_loss": float(row["thalamic_loss"]), "atrophy_gap": float(row["atrophy_gap"]),
            "disease_duration": float(row["disease_duration"]), "female": float(row["sex"] == "F"),
            "sdmt": float(row["sdmt"]),
        }
    pids = [p for p in sorted(first) if _first_scan(site_dir, p) is not None]
    if len(pids) < 4:
        return None
    y = np.array([first[p]["sdmt"] for p in pids])
    oracle = heldout_predictions(_oracle_matrix([first[p] for p in pids]), y)
    images = np.stack([template_image(_first_scan(site_dir, p)) for p in pids])

    def features(train: np.ndarray) -> np.ndarray:  # the lesion reference from the training folds only
        reference = image_features.NormativeReference.fit(images[train])
        x = image_features.feature_matrix(images, reference)
        x[train] = image_features.feature_matrix(images[train], reference, in_reference=True)
        return x

    image = heldout_predictions(features, y)
    mean = heldout_predictions(np.empty((len(y), 0)), y)
    out = {"n": len(y)}
    out["oracle_r2"], out["oracle_mae"] = _scores(y, oracle)
    out["image_r2"], out["image_mae"] = _scores(y, image)
    out["mean_r2"], out["mean_mae"] = _scores(y, mean)
    feats = image_features.feature_matrix(images, image_features.NormativeReference.fit(images), in_reference=True)
    column = {name: feats[:, j] for j, name in enumerate(image_features.FEATURES)}
    out["r_lesion_feature"], _ = _r(column["lesion_burden"], np.array([first[p]["log_lesion"] for p in pids]))
    out["r_thalamic_feature"], _ = _r(column["thalamic_darkening"], np.array([first[p]["thalamic_loss"] for p in pids]))
    return out


def population_ceiling(n: int = 20_000, seed: int = 0) -> dict[str, float]:
    """The oracle on ``n`` drawn MS subjects (no images): R^2 and MAE without small-sample noise."""
    from neurofed.data.synth.demographics import draw_subject, scan_state

    rng = np.random.default_rng(seed)
    subjects = [draw_subject(rng, "s", "ms", (20.0, 65.0)) for _ in range(n)]
    states = [scan_state(s) for s in subjects]
    rows = [{"age": st.age, "log_lesion": float(np.log(st.lesion_ml)), "thalamic_loss": st.thalamic_loss,
             "atrophy_gap": st.bio_age - st.age, "disease_duration": st.duration, "female": float(s.sex == "F")}
            for s, st in zip(subjects, states)]
    y = np.array([st.sdmt for st in states])
    out = {"n": n}
    out["oracle_r2"], out["oracle_mae"] = _scores(y, heldout_predictions(_oracle_matrix(rows), y))
    out["mean_r2"], out["mean_mae"] = _scores(y, heldout_predictions(np.empty((n, 0)), y))
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


def format_ceiling(results: dict[str, dict[str, float]]) -> str:
    header = (f"{'SDMT, held-out':<22}{'n':>6}  {'oracle R2':>9} {'MAE':>6}  {'image R2':>9} {'MAE':>6}  "
              f"{'mean MAE':>8}  {'r(lesion feat, lesion)':>22} {'r(thal feat, thal loss)':>23}")
    lines = [header, "-" * len(header)]
    for site, r in results.items():
        image = f"{r['image_r2']:>9.2f} {r['image_mae']:>6.2f}" if "image_mae" in r else f"{'':>9} {'':>6}"
        feats = (f"{r['r_lesion_feature']:>22.2f} {r['r_thalamic_feature']:>23.2f}" if "r_lesion_feature" in r
                 else f"{'':>22} {'':>23}")
        lines.append(f"{site:<22}{r['n']:>6}  {r['oracle_r2']:>9.2f} {r['oracle_mae']:>6.2f}  {image}  "
                     f"{r['mean_mae']:>8.2f}  {feats}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="folder holding one BIDS folder per site")
    parser.add_argument("--generate", type=int, metavar="N",
                        help="first synthesise N subjects per site (healthy and MS sites) into a temp dir")
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--site-effect", type=float, default=1.0, help="scanner difference scale for --generate")
    parser.add_argument("--population", type=int, default=20_000,
                        help="drawn MS subjects for the latent-only oracle row (0: skip)")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the tables to RESULTS/signal.txt with RESULTS/signal_meta.json (command, "
                             "commit, machine), from which the documentation is rendered")
    args = parser.parse_args(argv)
    if args.root is None and args.generate is None:
        parser.error("give --root DIR or --generate N")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if args.generate:
            for site in DEFAULT_SITES["healthy"] + DEFAULT_SITES["ms"]:
                generate_site(root, site, args.generate, resolution=args.resolution, seed=args.seed,
                              site_effect=args.site_effect, progress=False)
        site_dirs = sorted(p.parent for p in root.glob("*/participants.tsv"))
        if not site_dirs:
            print(f"no site folders with participants.tsv under {root}", file=sys.stderr)
            return 1
        results = {d.name: site_signal(d) for d in site_dirs}
        ceilings = {d.name: c for d in site_dirs if (c := ms_ceiling(d)) is not None}
    text = format_rows(results)
    if ceilings:
        if args.population:
            ceilings["all MS (latents only)"] = population_ceiling(args.population)
        text += "\n\n" + format_ceiling(ceilings)
    print(text)
    if args.results:
        from provenance import write_meta

        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "signal.txt").write_text(text + "\n")
        write_meta(args.results, [args.seed], root=str(args.root or f"--generate {args.generate}"),
                   population=args.population).rename(args.results / "signal_meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
