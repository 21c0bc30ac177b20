"""Floors and ceilings for the SDMT task, on the same split as the trained models: what a CNN has to beat.

Each reference is a linear model fitted on the pooled training subjects of the MS sites and evaluated on their
test subjects, for the split a run used (fractions, ``split_seed``, input size and cache of
``BrainMRIDataModule``):

``image features``     three hand-made features of the preprocessed input (``image_features.py``: ventricle
                       darkening, thalamic darkening, lesion burden): a floor a CNN should clear.
``linear probe``       the 16 features of a frozen brain-age backbone (a ``BrainAgeModule`` checkpoint), with its
                       BatchNorm statistics re-estimated on each site's training scans as the shallow arm's
                       frozen backbone has them (``neurofed.federated.precise_bn``): what a perfectly fitted
                       last layer on those features reaches.
``perfect brain age``  the generator's true biological and calendar age (``sourcedata/latents.tsv``): how much of
                       SDMT a perfect brain-age model could explain (the study: r 0.25–0.50).
``oracle``             the true drivers (age, log lesion load, thalamic loss, atrophy gap, disease duration, sex):
                       the ceiling; education and noise stay unexplained.

**Federation-compatible fit.** Every fit is a ridge regression solved from sums that each site computes on its own
training scans and that add up across sites — n, Σx, Σy, XᵀX, Xᵀy (``RidgeSums``) — as the trainer sums
parameters; the penalty is chosen by the pooled validation MAE (each site sends Σ|e| and n per penalty). No
subject-level value leaves a site; here one process plays every site.

Rows are keyed as ``benchmarks/replication.py``'s ``read_test_predictions``: site (the root's folder name),
subject, session (``ses-<label>`` or ``n/a``), target, prediction.

    from sdmt_references import SplitSettings, reference_predictions
    rows = reference_predictions(ms_roots, SplitSettings(split_seed=42, cache_dir="results/replication/cache"),
                                 brain_age_checkpoint="results/replication/runs/federated_fedavg_s0/site-0/best.ckpt")
    rows["linear probe"]   # [{"site", "subject", "session", "target", "prediction"}, ...]

    python benchmarks/sdmt_references.py --roots A,B,C --cache-dir results/x/cache --split-seeds 42,43,44 \\
        --brain-age-checkpoint ckpt1,ckpt2,ckpt3 --results docs/results/sdmt   # the floor table
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

__all__ = ["ORACLE_COLUMNS", "REFERENCES", "RidgeSums", "SplitSettings", "image_feature_predictions",
           "linear_probe_predictions", "load_sites", "perfect_brain_age_predictions", "oracle_predictions",
           "reference_predictions"]

REFERENCES = ("image features", "linear probe", "perfect brain age", "oracle")
ORACLE_COLUMNS = ("age", "log_lesion", "thalamic_loss", "atrophy_gap", "disease_duration", "female")
PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0)  # ridge penalties on standardised predictors, chosen on validation MAE


@dataclass(frozen=True)
class SplitSettings:
    """The data settings of a run: the references must see its subjects, split and input."""

    split: tuple[float, float, float] = (0.55, 0.15, 0.30)
    split_seed: int = 42
    spacing: float = 4.0
    shape: tuple[int, int, int] = (48, 56, 48)
    cache_dir: str | None = None
    batch_size: int = 8


@dataclass
class Site:
    """One MS site's scans in the run's split, with the data module that read them."""

    name: str
    root: Path
    datamodule: object
    scans: dict[str, list] = field(default_factory=dict)  # split -> ScanRecords with a label


def session_key(record) -> str:
    return f"ses-{record.session}" if record.session else "n/a"


def load_sites(roots: Sequence[str | Path], settings: SplitSettings) -> list[Site]:
    """Index, cache and split every root as the run's ``BrainMRIDataModule`` did (one per site)."""
    from neurofed.data import BrainMRIDataModule

    sites = []
    for root in roots:
        dm = BrainMRIDataModule(root=str(root), label="sdmt", spacing=settings.spacing, shape=tuple(settings.shape),
                                split=tuple(settings.split), split_seed=settings.split_seed,
                                batch_size=settings.batch_size, cache_dir=settings.cache_dir, num_workers=0)
        dm.prepare_data()
        dm.setup("fit")
        scans = {"train": dm.train_records, "val": dm.val_records, "test": dm.test_records[0]}
        sites.append(Site(Path(root).name, Path(root), dm, scans))
    return sites


# ------------------------------------------------------------------------------------------ federated ridge


@dataclass
class RidgeSums:
    """What one site sends for a ridge fit: n, Σx, Σy, Σy², XᵀX, Xᵀy. Sites' sums add up."""

    n: int
    sx: np.ndarray
    sy: float
    syy: float
    xx: np.ndarray
    xy: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> RidgeSums:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return cls(len(y), x.sum(0), float(y.sum()), float(y @ y), x.T @ x, x.T @ y)

    def __add__(self, other: RidgeSums) -> RidgeSums:
        return RidgeSums(self.n + other.n, self.sx + other.sx, self.sy + other.sy, self.syy + other.syy,
                         self.xx + other.xx, self.xy + other.xy)

    def solve(self, penalty: float) -> tuple[float, np.ndarray]:
        """Intercept and coefficients of the ridge fit on standardised predictors (pooled moments)."""
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        cov = self.xx / self.n - np.outer(mean_x, mean_x)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        sd[sd == 0] = 1.0
        zz = cov / np.outer(sd, sd) * self.n
        zy = (self.xy / self.n - mean_x * mean_y) / sd * self.n
        beta = np.linalg.solve(zz + penalty * np.eye(len(sd)), zy) / sd
        return mean_y - float(mean_x @ beta), beta


def federated_ridge(x: dict[str, dict[str, np.ndarray]], y: dict[str, dict[str, np.ndarray]],
                    penalties: Sequence[float] = PENALTIES) -> tuple[float, np.ndarray, float]:
    """Fit on every site's training rows (summed sums), choose the penalty by pooled validation MAE.

    ``x[site][split]``: ``[n, k]`` predictors; ``y[site][split]``: ``[n]`` targets. Returns intercept, coefficients
    and the chosen penalty. Without validation rows the smallest penalty is used.
    """
    sums = None
    for site in x:
        if len(y[site]["train"]):
            part = RidgeSums.of(x[site]["train"], y[site]["train"])
            sums = part if sums is None else sums + part
    if sums is None or sums.n < 2:
        raise ValueError("no training scans to fit a reference on")
    best = None
    for penalty in penalties:
        intercept, coef = sums.solve(penalty)
        abs_err = n_val = 0.0
        for site in x:  # each site: Σ|e| and n of its validation scans
            if len(y[site]["val"]):
                abs_err += float(np.abs(intercept + x[site]["val"] @ coef - y[site]["val"]).sum())
                n_val += len(y[site]["val"])
        score = abs_err / n_val if n_val else 0.0
        if best is None or score < best[0]:
            best = (score, intercept, coef, penalty)
    return best[1], best[2], best[3]


def _predict(sites: list[Site], predictors: Callable[[Site, str], np.ndarray]) -> list[dict]:
    """Test rows of a ridge fitted on ``predictors(site, split)`` (``[n, k]`` per site and split)."""
    x = {s.name: {sp: predictors(s, sp) for sp in ("train", "val", "test")} for s in sites}
    y = {s.name: {sp: np.array([r.label for r in s.scans[sp]], dtype=np.float64) for sp in ("train", "val", "test")}
         for s in sites}
    intercept, coef, _ = federated_ridge(x, y)
    rows = []
    for s in sites:
        for record, pred in zip(s.scans["test"], intercept + x[s.name]["test"] @ coef):
            rows.append({"site": s.name, "subject": record.participant_id, "session": session_key(record),
                         "target": float(record.label), "prediction": float(pred)})
    return rows


# ---------------------------------------------------------------------------------------------- predictors


def read_latents(root: Path) -> dict[tuple[str, str], dict[str, str]]:
    """``sourcedata/latents.tsv`` of a synthetic site, by (participant, session)."""
    path = root / "sourcedata" / "latents.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the perfect-brain-age and oracle references need the true "
                                "variables that `neurofed synth` writes there")
    with open(path, newline="") as fh:
        return {(row["participant_id"], row["session_id"]): row for row in csv.DictReader(fh, delimiter="\t")}


def latent_values(row: dict[str, str]) -> dict[str, float]:
    return {"age": float(row["age"]), "bio_age": float(row["bio_age"]),
            "log_lesion": math.log(max(float(row["lesion_ml"]), 1e-3)), "thalamic_loss": float(row["thalamic_loss"]),
            "atrophy_gap": float(row["atrophy_gap"]), "disease_duration": float(row["disease_duration"]),
            "female": float(row["sex"] == "F")}


def _latent_predictors(columns: Sequence[str]) -> Callable[[Site, str], np.ndarray]:
    cache: dict[Path, dict] = {}

    def predictors(site: Site, split: str) -> np.ndarray:
        latents = cache.setdefault(site.root, read_latents(site.root))
        values = [latent_values(latents[(r.participant_id, session_key(r))]) for r in site.scans[split]]
        return np.array([[v[c] for c in columns] for v in values], dtype=np.float64).reshape(-1, len(columns))

    return predictors


def perfect_brain_age_predictions(sites: list[Site]) -> list[dict]:
    """SDMT from the true biological and calendar age: what a perfect brain-age model could explain."""
    return _predict(sites, _latent_predictors(("bio_age", "age")))


def oracle_predictions(sites: list[Site]) -> list[dict]:
    """SDMT from the true drivers the generator scores it with (education and noise excepted)."""
    return _predict(sites, _latent_predictors(ORACLE_COLUMNS))


#: Template-space images by cache file: the same scan appears in every size and seed of a study.
_TEMPLATE_IMAGES: dict[Path, np.ndarray] = {}


def template_images(site: Site, split: str) -> np.ndarray:
    """The split's scans normalised, aligned and resampled onto the feature grid (``image_features.py``)."""
    import image_features
    from neurofed.data.preprocessing import output_affine

    dm = site.datamodule
    images = []
    for record in site.scans[split]:
        path = dm.cache.path_for(dm.cache.key(record.paths, dm.config))
        if path not in _TEMPLATE_IMAGES:
            _TEMPLATE_IMAGES[path] = image_features.template_space(
                np.load(path), output_affine(record.paths["T1w"], dm.config)).astype(np.float16)
        images.append(_TEMPLATE_IMAGES[path].astype(np.float32))
    return np.stack(images) if images else np.zeros((0, *image_features.GRID_SHAPE), np.float32)


def image_feature_matrices(sites: list[Site]) -> dict[str, dict[str, np.ndarray]]:
    """Per site and split, the image features; the lesion reference from every site's training scans (summed)."""
    import image_features

    images = {s.name: {sp: template_images(s, sp) for sp in ("train", "val", "test")} for s in sites}
    reference = None
    for s in sites:  # each site sums its own training scans; the sums add up
        if len(images[s.name]["train"]):
            part = image_features.NormativeReference.fit(images[s.name]["train"])
            reference = part if reference is None else reference + part
    return {name: {sp: image_features.feature_matrix(im, reference, in_reference=sp == "train")
                   for sp, im in by_split.items()} for name, by_split in images.items()}


def image_feature_predictions(sites: list[Site]) -> list[dict]:
    """SDMT from the three image features (``image_features.py``)."""
    matrices = image_feature_matrices(sites)
    return _predict(sites, lambda site, split: matrices[site.name][split])


def backbone_features(site: Site, checkpoint: str | Path) -> dict[str, np.ndarray]:
    """The frozen backbone's output for every scan of the site, BatchNorm statistics re-estimated on its
    training split as the federated trainer does for the shallow arm (``precise_bn``)."""
    import torch

    from neurofed.federated.precise_bn import recompute_batchnorm, statistics_loader
    from neurofed.models import BrainAgeModule

    model = BrainAgeModule.load_from_checkpoint(str(checkpoint), map_location="cpu")
    dm = site.datamodule
    recompute_batchnorm(model, statistics_loader(dm.train_dataloader()), dm)
    model.eval()
    out = {}
    with torch.no_grad():
        for split, records in site.scans.items():
            feats = []
            for start in range(0, len(records), dm.batch_size):
                batch = [np.load(dm.cache.path_for(dm.cache.key(r.paths, dm.config)))
                         for r in records[start:start + dm.batch_size]]
                image = model._image({"image": torch.from_numpy(np.stack(batch))})
                feats.append(model.backbone(image).float().numpy())
            width = model.backbone.out_features
            out[split] = np.concatenate(feats).astype(np.float64) if feats else np.zeros((0, width))
    return out


def linear_probe_predictions(sites: list[Site], checkpoint: str | Path) -> list[dict]:
    """SDMT from the frozen brain-age backbone's features by a ridge (the best a retrained last layer can do)."""
    features = {s.name: backbone_features(s, checkpoint) for s in sites}
    return _predict(sites, lambda site, split: features[site.name][split])


def reference_predictions(roots: Sequence[str | Path], settings: SplitSettings,
                          brain_age_checkpoint: str | Path | None = None) -> dict[str, list[dict]]:
    """Test predictions of every reference (the linear probe only with a checkpoint), keyed like the
    replication's ``read_test_predictions`` rows."""
    sites = load_sites(roots, settings)
    rows = {"image features": image_feature_predictions(sites)}
    if brain_age_checkpoint is not None:
        rows["linear probe"] = linear_probe_predictions(sites, brain_age_checkpoint)
    rows["perfect brain age"] = perfect_brain_age_predictions(sites)
    rows["oracle"] = oracle_predictions(sites)
    return rows


# ---------------------------------------------------------------------------------------------- floor table


def feature_correlations(sites: list[Site]) -> list[dict]:
    """Pearson r of each image feature with the true lesion load (log), thalamic loss, atrophy gap and
    biological age, per site and pooled, over every scan of the split (the lesion reference from its
    training scans)."""
    import image_features

    matrices = image_feature_matrices(sites)
    truths = _latent_predictors(("log_lesion", "thalamic_loss", "atrophy_gap", "bio_age"))
    per_site = {}
    for s in sites:
        feats = np.concatenate([matrices[s.name][sp] for sp in ("train", "val", "test")])
        truth = np.concatenate([truths(s, sp) for sp in ("train", "val", "test")])
        per_site[s.name] = (feats, truth)
    per_site["pooled"] = tuple(np.concatenate([per_site[s.name][i] for s in sites]) for i in (0, 1))
    rows = []
    for site, (feats, truth) in per_site.items():
        for j, name in enumerate(image_features.FEATURES):
            r = [float(np.corrcoef(feats[:, j], truth[:, k])[0, 1]) if len(feats) > 2 else math.nan for k in range(4)]
            rows.append({"site": site, "n": len(feats), "feature": name, "r_lesion": r[0], "r_thalamic": r[1],
                         "r_atrophy": r[2], "r_bio_age": r[3]})
    return rows


def floor_summary(per_seed: dict[int, dict[str, list[dict]]], train_means: dict[int, float],
                  n_boot: int) -> dict[str, dict]:
    """MAE with intervals over seeds and subjects, R² and r of every reference and of predict-the-mean."""
    from neurofed.stats import BootstrapWeights

    keys, target, preds = [], [], {}
    for seed, by_model in per_seed.items():
        first = {(r["site"], r["subject"], r["session"]): r for r in next(iter(by_model.values()))}
        for key in sorted(first):
            keys.append((seed, *key))
            target.append(first[key]["target"])
        for model, rows in by_model.items():
            table = {(r["site"], r["subject"], r["session"]): r["prediction"] for r in rows}
            preds.setdefault(model, []).extend(table[key] for key in sorted(first))
        preds.setdefault("predict-the-mean", []).extend([train_means[seed]] * len(first))
    target = np.asarray(target)
    weights = BootstrapWeights([f"{k[0]}/{k[1]}/{k[2]}" for k in keys], [f"{k[0]}/{k[1]}" for k in keys],
                               n_boot=n_boot, seed=0, groups=[k[0] for k in keys])
    out = {}
    for model in ["predict-the-mean", *REFERENCES]:
        if model not in preds:
            continue
        pred = np.asarray(preds[model])
        out[model] = {"mae": weights.mae(np.abs(pred - target)),
                      "r2": 1 - float(np.sum((pred - target) ** 2) / np.sum((target - target.mean()) ** 2)),
                      "r": float(np.corrcoef(pred, target)[0, 1]) if np.std(pred) > 0 else math.nan,
                      "n": int(target.size)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roots", required=True, help="comma-separated MS site folders (BIDS, from neurofed synth)")
    parser.add_argument("--cache-dir", required=True, help="the runs' preprocessed-scan cache")
    parser.add_argument("--split", default="0.55,0.15,0.30")
    parser.add_argument("--split-seeds", default="42,43,44,45,46", help="one split per seed (the runs' 42 + seed)")
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--shape", default="48,56,48")
    parser.add_argument("--brain-age-checkpoints", default=None,
                        help="comma-separated BrainAgeModule checkpoints, one per split seed (or one for all): "
                             "the linear probe")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--results", type=Path, default=None, help="write floor.tsv/.json/.md and "
                        "feature_correlations.tsv here")
    args = parser.parse_args(argv)
    roots = [r for r in args.roots.split(",") if r]
    split_seeds = [int(s) for s in args.split_seeds.split(",")]
    ckpts = args.brain_age_checkpoints.split(",") if args.brain_age_checkpoints else [None]
    if len(ckpts) == 1:
        ckpts = ckpts * len(split_seeds)
    if len(ckpts) != len(split_seeds):
        parser.error(f"--brain-age-checkpoints gives {len(ckpts)} checkpoints for {len(split_seeds)} split seeds")
    split = tuple(float(x) for x in args.split.split(","))
    shape = tuple(int(x) for x in args.shape.split(","))
    per_seed, means, correlations = {}, {}, None
    for seed, ckpt in zip(split_seeds, ckpts):
        settings = SplitSettings(split=split, split_seed=seed, spacing=args.spacing, shape=shape,
                                 cache_dir=args.cache_dir)
        sites = load_sites(roots, settings)
        if correlations is None:
            correlations = feature_correlations(sites)
        per_seed[seed] = {"image features": image_feature_predictions(sites)}
        if ckpt:
            per_seed[seed]["linear probe"] = linear_probe_predictions(sites, ckpt)
        per_seed[seed]["perfect brain age"] = perfect_brain_age_predictions(sites)
        per_seed[seed]["oracle"] = oracle_predictions(sites)
        means[seed] = float(np.mean([r.label for s in sites for r in s.scans["train"]]))
        print(f"split seed {seed}: done", flush=True)
    summary = floor_summary(per_seed, means, args.n_boot)
    corr_lines = ["site\tn\tfeature\tr_lesion\tr_thalamic\tr_atrophy\tr_bio_age"]
    corr_lines += [f"{c['site']}\t{c['n']}\t{c['feature']}\t{c['r_lesion']:.3f}\t{c['r_thalamic']:.3f}\t"
                   f"{c['r_atrophy']:.3f}\t{c['r_bio_age']:.3f}" for c in correlations]
    floor_lines = ["model\tmae\tlow\thigh\tr2\tr\ttest_scans"]
    floor_lines += [f"{m}\t{v['mae'].estimate:.3f}\t{v['mae'].low:.3f}\t{v['mae'].high:.3f}\t{v['r2']:.3f}\t"
                    f"{v['r']:.3f}\t{v['n']}" for m, v in summary.items()]
    md = ["### SDMT floor and ceiling (points; test subjects of every split seed pooled)", "",
          f"Split seeds {', '.join(map(str, split_seeds))}; 95 % intervals resample seeds, then test subjects "
          "within seed and site.", "", "| reference | MAE [95 % CI] | R² | r |", "|---|---|---|---|"]
    md += [f"| {m} | {v['mae'].format()} | {v['r2']:.2f} | {'' if math.isnan(v['r']) else format(v['r'], '.2f')} |"
           for m, v in summary.items()]
    md += ["", "### Image features vs the true variables (Pearson r; first split seed's lesion reference)", "",
           "| site | n | feature | lesion load (log) | thalamic loss | atrophy gap | biological age |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {c['site']} | {c['n']} | {c['feature']} | {c['r_lesion']:.2f} | {c['r_thalamic']:.2f} | "
           f"{c['r_atrophy']:.2f} | {c['r_bio_age']:.2f} |" for c in correlations]
    print("\n".join(md))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "floor.tsv").write_text("\n".join(floor_lines) + "\n")
        (args.results / "feature_correlations.tsv").write_text("\n".join(corr_lines) + "\n")
        (args.results / "floor.md").write_text("\n".join(md) + "\n")
        from sdmt_learning_curve import command_line, git_commit

        (args.results / "floor.json").write_text(json.dumps({
            "commit": git_commit(), "command": command_line(),
            "split_seeds": split_seeds, "checkpoints": ckpts, "n_boot": args.n_boot}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
