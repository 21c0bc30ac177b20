"""`neurofed synth`: write several synthetic sites and print what was written.

The generator is imported when the command runs, not when its options are listed: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from neurofed.data.synth.site_effect import scaled_profile
from neurofed.data.synth.sites import COHORTS, DEFAULT_SITES, SITES, get_site

MIN_SITE_SUBJECTS = 6  # fewer cannot be split into train/val/test by subject


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder; each site goes to OUT/<site>/")
    parser.add_argument("--sites", default=None,
                        help=f"comma-separated sites (known: {', '.join(SITES)}); "
                             "default: the cohort's three sites")
    parser.add_argument("--subjects", type=int, default=20,
                        help="subjects per site (--sizes equal) or mean per site (--sizes reference)")
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size in mm")
    parser.add_argument("--cohort", choices=COHORTS, default=None,
                        help="population; default: each site's own (ixi/sald/camcan healthy, others MS)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the subjects' anatomy, ages and scanner noise: the same seed writes the "
                             "same sites")
    parser.add_argument("--sessions", type=float, default=0.2,
                        help="fraction of subjects with a second session 1-3 years later")
    parser.add_argument("--sizes", choices=("reference", "equal"), default="reference",
                        help="reference: keep the reference study's relative site sizes (at least "
                             f"{MIN_SITE_SUBJECTS} each); equal: --subjects per site")
    parser.add_argument("--site-effect", type=float, default=1.0,
                        help="scale of the scanner differences between sites: 0 = all sites one scanner, "
                             "1 = published between-scanner differences (default), 2 = twice them")
    parser.add_argument("--raw", action="store_true",
                        help="raw-like scans: skull, scalp and neck, native pose (±15°, ±20 mm), off-centre "
                             "field of view; true transforms in sourcedata/transforms.tsv (for "
                             "registration: affine and the input QC)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars (shown by default)")


def site_sizes(sites: list[str], subjects: int, sizes: str) -> dict[str, int]:
    """Subjects per site: equal, or proportional to reference sizes with a mean of ``subjects``."""
    if sizes == "equal":
        return {s: subjects for s in sites}
    refs = {s: get_site(s).reference_size for s in sites}
    total = subjects * len(sites)
    return {s: max(MIN_SITE_SUBJECTS, int(round(total * r / sum(refs.values())))) for s, r in refs.items()}


def parse_sites(text: str | None, cohort: str | None) -> list[str]:
    if not text:
        return list(DEFAULT_SITES[cohort or "healthy"])
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError(f"--sites is empty; known sites: {', '.join(SITES)}")
    for name in names:
        get_site(name)
    return list(dict.fromkeys(names))


def format_summary(rows: dict[str, dict[str, float]]) -> str:
    header = f"{'site':<12}{'subjects':>9}{'scans':>7}  {'age mean±SD [min–max]':<26}{'sdmt mean±SD':<16}{'s/subject':>9}"
    lines = [header, "-" * len(header)]
    for site, r in rows.items():
        age = f"{r['age_mean']:.1f}±{r['age_sd']:.1f} [{r['age_min']:.0f}–{r['age_max']:.0f}]"
        sdmt = f"{r['sdmt_mean']:.1f}±{r['sdmt_sd']:.1f}"
        lines.append(f"{site:<12}{r['subjects']:>9}{r['scans']:>7}  {age:<26}{sdmt:<16}"
                     f"{r['seconds_per_subject']:>9.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from neurofed.data.synth.generate import generate_site
    from neurofed.data.synth.summary import summarize_site
    from neurofed.data.synth.template import load_template

    try:
        sites = parse_sites(args.sites, args.cohort)
        for site in sites:  # check the scale before anything is written
            scaled_profile(get_site(site), getattr(args, "site_effect", 1.0))
    except ValueError as err:
        print(f"neurofed synth: {err}", file=sys.stderr)
        return 2
    load_template(args.resolution)  # once, so that per-subject timings exclude it
    rows = {}
    for site, n in site_sizes(sites, args.subjects, args.sizes).items():
        start = time.perf_counter()
        path = generate_site(args.out, site, n, resolution=args.resolution, seed=args.seed,
                             cohort=args.cohort, session_fraction=args.sessions,
                             progress=getattr(args, "progress", True),
                             site_effect=getattr(args, "site_effect", 1.0), raw=getattr(args, "raw", False))
        rows[site] = summarize_site(path) | {"seconds_per_subject": (time.perf_counter() - start) / n}
    print(f"wrote {len(rows)} site(s) under {args.out}")
    print(format_summary(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry, e.g. ``python -m neurofed.data.synth.command --out synth``."""
    parser = argparse.ArgumentParser(prog="neurofed synth", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
