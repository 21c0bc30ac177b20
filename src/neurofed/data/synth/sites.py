"""Scanner/site profiles for the synthetic cohorts.

Real multi-site data differ in who was scanned (age range, disease) and how (contrast, intensity scale,
bias field, noise, blur, field of view). A model that only ever sees one profile learns the scanner, not
the brain, so each synthetic site gets its own profile. ``reference_size`` keeps the relative cohort sizes
of the reference study so that federated weighting behaves as it did there.

The scanner values follow published between-scanner measurements (sources and derivations in
``docs/synthetic_data.md``): tissue contrast and noise by field strength, intensity non-uniformity as in
the BrainWeb simulator's 20 % (1.5 T) and 30 % (3 T, between its 20 and 40 % levels), and blur from each
site's native voxel size. ``site_effect.scaled_profile`` shrinks or stretches the differences.
"""

from __future__ import annotations

from dataclasses import dataclass

COHORTS = ("healthy", "ms")


@dataclass(frozen=True)
class Scanner:
    """What a T1w sidecar says about the (synthetic) acquisition."""

    manufacturer: str
    model: str
    field_strength_t: float
    voxel_mm: tuple[float, float, float]  # native acquisition voxel, the source of ``blur_mm``
    repetition_time_s: float
    echo_time_s: float
    inversion_time_s: float
    flip_angle_deg: float


@dataclass(frozen=True)
class SiteProfile:
    """How one site's population and scanner look.

    Contrast values are relative T1w intensities of CSF, GM and WM before the site's intensity ``scale``;
    ``bias_strength`` is the intensity non-uniformity (median peak-to-peak fraction over the brain);
    ``noise_sd`` is the Rician noise SD relative to WM; ``blur_mm`` the Gaussian sigma of the point-spread
    function (native voxel FWHM / 2.355); ``fov_mm`` the field of view, so the matrix size follows from
    the requested resolution.
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
    scanner: Scanner | None = None


def _fwhm_sigma(voxel_mm: tuple[float, float, float]) -> float:
    """Gaussian sigma whose FWHM is the largest native voxel edge."""
    return round(max(voxel_mm) / 2.355, 3)


# MPRAGE-like timings by vendor/field (typical protocol values; the sidecars mark them as synthetic).
_PHILIPS_15 = Scanner("Philips", "Gyroscan Intera (synthetic)", 1.5, (0.94, 0.94, 1.2), 0.0098, 0.0046, 0.0, 8.0)
_SIEMENS_TRIO = Scanner("Siemens", "TrioTim (synthetic)", 3.0, (1.0, 1.0, 1.0), 2.25, 0.00299, 0.9, 9.0)
_PHILIPS_3 = Scanner("Philips", "Achieva (synthetic)", 3.0, (1.0, 1.0, 1.0), 0.0081, 0.0037, 0.0, 8.0)
_SIEMENS_15 = Scanner("Siemens", "Avanto (synthetic)", 1.5, (1.0, 1.0, 1.0), 1.9, 0.00342, 1.1, 15.0)
_SIEMENS_15_P = Scanner("Siemens", "Avanto (synthetic)", 1.5, (1.0, 1.0, 1.2), 2.2, 0.0037, 0.9, 15.0)

# contrast (CSF, GM, WM): GM/WM ~0.68 at 1.5 T and ~0.62 at 3 T (white/grey contrast is higher at 3 T);
# noise: GM/WM contrast-to-noise ~10 at 1.5 T and 10-29 at 3 T -> noise_sd = (1 - GM/WM) / CNR.
SITES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        SiteProfile("ixi", "healthy", (20.0, 86.0), 586, (0.31, 0.68, 1.00), 1000.0, 0.20, 0.032,
                    _fwhm_sigma(_PHILIPS_15.voxel_mm), (176.0, 208.0, 176.0), "int16", (0.0, -2.0, 4.0),
                    _PHILIPS_15),
        SiteProfile("sald", "healthy", (19.0, 80.0), 491, (0.25, 0.61, 1.00), 1.0, 0.30, 0.020,
                    _fwhm_sigma(_SIEMENS_TRIO.voxel_mm), (168.0, 200.0, 168.0), "float32", (1.0, 2.0, -2.0),
                    _SIEMENS_TRIO),
        SiteProfile("camcan", "healthy", (18.0, 88.0), 653, (0.26, 0.62, 1.00), 3000.0, 0.30, 0.018,
                    _fwhm_sigma(_SIEMENS_TRIO.voxel_mm), (184.0, 216.0, 184.0), "int16", (-1.0, 0.0, 0.0),
                    _SIEMENS_TRIO),
        SiteProfile("brussels", "ms", (20.0, 65.0), 96, (0.27, 0.63, 1.00), 800.0, 0.30, 0.022,
                    _fwhm_sigma(_PHILIPS_3.voxel_mm), (176.0, 200.0, 176.0), "int16", (0.0, 3.0, 2.0),
                    _PHILIPS_3),
        SiteProfile("greifswald", "ms", (20.0, 65.0), 756, (0.30, 0.67, 1.00), 2000.0, 0.20, 0.033,
                    _fwhm_sigma(_SIEMENS_15.voxel_mm), (180.0, 212.0, 180.0), "int16", (2.0, -3.0, 0.0),
                    _SIEMENS_15),
        SiteProfile("prague", "ms", (20.0, 65.0), 2424, (0.31, 0.69, 1.00), 1500.0, 0.20, 0.035,
                    _fwhm_sigma(_SIEMENS_15_P.voxel_mm), (172.0, 208.0, 172.0), "int16", (-2.0, 0.0, 3.0),
                    _SIEMENS_15_P),
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
