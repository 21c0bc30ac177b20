"""Scanner/site profiles for the synthetic cohorts.

Real multi-site data differ in who was scanned (age range, disease) and how (contrast, intensity scale,
bias field, noise, blur, field of view). A model that only ever sees one profile learns the scanner, not
the brain, so each synthetic site gets its own profile. ``reference_size`` keeps the relative cohort sizes
of the reference study so that federated weighting behaves as it did there.
"""

from __future__ import annotations

from dataclasses import dataclass

COHORTS = ("healthy", "ms")


@dataclass(frozen=True)
class SiteProfile:
    """How one site's population and scanner look.

    Contrast values are relative T1w intensities of CSF, GM and WM before the site's intensity ``scale``;
    ``fov_mm`` is the field of view, so the matrix size follows from the requested resolution.
    """

    name: str
    cohort: str
    age_range: tuple[float, float]
    reference_size: int
    contrast: tuple[float, float, float]  # CSF, GM, WM
    scale: float
    bias_strength: float
    noise_sd: float  # relative to WM intensity
    blur_mm: float  # Gaussian sigma of the point-spread function
    fov_mm: tuple[float, float, float]
    dtype: str = "int16"
    center_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


SITES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile("ixi", "healthy", (20.0, 86.0), 586, (0.30, 0.62, 0.95), 1000.0, 0.25, 0.030, 0.6,
                    (176.0, 208.0, 176.0), "int16", (0.0, -2.0, 4.0)),
        SiteProfile("sald", "healthy", (19.0, 80.0), 491, (0.22, 0.55, 0.90), 1.0, 0.15, 0.040, 0.9,
                    (168.0, 200.0, 168.0), "float32", (1.0, 2.0, -2.0)),
        SiteProfile("camcan", "healthy", (18.0, 88.0), 653, (0.26, 0.66, 1.00), 3000.0, 0.20, 0.025, 0.4,
                    (184.0, 216.0, 184.0), "int16", (-1.0, 0.0, 0.0)),
        SiteProfile("brussels", "ms", (20.0, 65.0), 96, (0.28, 0.58, 0.92), 800.0, 0.30, 0.035, 0.7,
                    (176.0, 200.0, 176.0), "int16", (0.0, 3.0, 2.0)),
        SiteProfile("greifswald", "ms", (20.0, 65.0), 756, (0.24, 0.60, 0.97), 2000.0, 0.20, 0.030, 0.5,
                    (180.0, 212.0, 180.0), "int16", (2.0, -3.0, 0.0)),
        SiteProfile("prague", "ms", (20.0, 65.0), 2424, (0.31, 0.64, 0.93), 1500.0, 0.25, 0.028, 0.6,
                    (172.0, 208.0, 172.0), "int16", (-2.0, 0.0, 3.0)),
    )
}

DEFAULT_SITES: dict[str, tuple[str, ...]] = {
    "healthy": ("ixi", "sald", "camcan"),
    "ms": ("brussels", "greifswald", "prague"),
}

# Used when a site's scanner profile is asked to host the other cohort.
COHORT_AGE_RANGE: dict[str, tuple[float, float]] = {"healthy": (18.0, 88.0), "ms": (20.0, 65.0)}


def get_site(name: str) -> SiteProfile:
    """Return the profile of ``name``; the error lists the known sites so a typo is easy to fix."""
    try:
        return SITES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown synthetic site {name!r}; known sites: {', '.join(SITES)}"
        ) from None
