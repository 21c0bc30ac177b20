"""The JSON files that make a synthetic site a valid, self-describing BIDS dataset.

The BIDS validator warns when a T1w image has no sidecar, when a TSV column is not described, and when
``dataset_description.json`` names no authors. A user reading the folder later should also learn, from
every file, that the data are simulated and how they were made, so each file says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from neurofed.data.synth.sites import SiteProfile

GENERATOR_NAME = "neurofed synth"
BIDS_VERSION = "1.9.0"
SYNTHETIC_NOTE = ("Synthetic image simulated by neurofed synth from the MNI ICBM152 2009 template; "
                  "not acquired from a person. Scanner fields describe the simulated scanner.")

PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "Unique participant identifier"},
    "age": {"Description": "Age at the first scan", "Units": "year"},
    "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
    "sdmt": {"Description": "Synthetic Symbol Digit Modalities Test score at the first scan",
             "Units": "correct responses"},
}
MS_COLUMNS = {
    "lesion_ml": {"Description": "T1-hypointense lesion volume at the first scan", "Units": "ml"},
    "disease_duration": {"Description": "Time since MS onset at the first scan", "Units": "year"},
}


def _at_each_session(columns: dict[str, dict]) -> dict[str, dict]:
    """The participant columns that change over time, described per session instead of at the first scan."""
    return {name: {**spec, "Description": spec["Description"].replace("at the first scan", "at this session")}
            for name, spec in columns.items()}


SESSION_COLUMNS = {
    "session_id": {"Description": "Session identifier (ses-1 is the first scan)"},
    **{k: v for k, v in _at_each_session(PARTICIPANT_COLUMNS).items() if k in ("age", "sdmt")},
}
MS_SESSION_COLUMNS = _at_each_session(MS_COLUMNS)
LATENT_COLUMNS = {
    "participant_id": {"Description": "Unique participant identifier"},
    "session_id": {"Description": "Session identifier, n/a for subjects with one scan and no session level"},
    "age": {"Description": "Chronological age at the scan", "Units": "year"},
    "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
    "bio_age": {"Description": "Biological age the anatomy was rendered at", "Units": "year"},
    "atrophy_gap": {"Description": "bio_age minus age (brain-age gap, including MS atrophy)", "Units": "year"},
    "disease_duration": {"Description": "Time since MS onset (0 for healthy)", "Units": "year"},
    "lesion_ml": {"Description": "MS lesion volume rendered (0 for healthy)", "Units": "ml"},
    "wmh_ml": {"Description": "Age-related white-matter hypointensity volume rendered", "Units": "ml"},
    "thalamic_loss": {"Description": "Fraction of thalamic grey matter removed by MS (0 for healthy)"},
    "education": {"Description": "Education-like z-score that moves SDMT and no image shows"},
    "sdmt": {"Description": "Synthetic SDMT score", "Units": "correct responses"},
}


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def t1w_sidecar(profile: SiteProfile, resolution: float, site_effect: float) -> dict:
    """Sidecar of one T1w image: the simulated scanner, plus a note that the data are synthetic."""
    sidecar = {"Modality": "MR"}
    if profile.scanner is not None:
        s = profile.scanner
        sidecar |= {
            "Manufacturer": s.manufacturer, "ManufacturersModelName": s.model,
            "MagneticFieldStrength": s.field_strength_t, "RepetitionTime": s.repetition_time_s,
            "EchoTime": s.echo_time_s, "FlipAngle": s.flip_angle_deg,
        }
        if s.inversion_time_s > 0:
            sidecar["InversionTime"] = s.inversion_time_s
        sidecar["AcquisitionVoxelSize"] = list(s.voxel_mm)
    sidecar |= {
        "MRAcquisitionType": "3D", "ScanningSequence": "GR", "SequenceVariant": "SP\\MP",
        "PulseSequenceType": "MPRAGE-like (simulated)",
        "InstitutionName": f"synthetic site {profile.name}",
        "InstitutionAddress": "none (synthetic data)",
        "InstitutionalDepartmentName": "none (synthetic data)",
        "StationName": f"synthetic-{profile.name}",
        "DeviceSerialNumber": f"synthetic-{profile.name}",
        "ReceiveCoilName": "none (simulated)",
        "ReceiveCoilActiveElements": "none (simulated)",
        "MatrixCoilMode": "none (simulated)",
        "CoilCombinationMethod": "none (simulated)",
        "SequenceName": "simulated MPRAGE-like T1w",
        "PulseSequenceDetails": "tissue maps rendered with site contrast, bias field, blur and Rician noise",
        "NonlinearGradientCorrection": False,
        "SoftwareVersions": GENERATOR_NAME,
        "ImageComments": SYNTHETIC_NOTE,
        "SynthesisParameters": {"ResolutionMM": resolution, "SiteEffect": site_effect,
                                "NoiseSDRelativeToWM": round(profile.noise_sd, 5),
                                "BiasFieldStrength": round(profile.bias_strength, 4),
                                "BlurSigmaMM": round(profile.blur_mm, 4),
                                "ContrastCSFGMWM": list(profile.contrast)},
    }
    return sidecar


def write_dataset_files(site_dir: Path, profile: SiteProfile, cohort: str, seed: int, resolution: float,
                        n_subjects: int, site_effect: float, has_sessions: bool) -> None:
    """participants.json, sessions.json, dataset_description.json and README of a written site."""
    from neurofed import __version__

    write_json(site_dir / "participants.json", PARTICIPANT_COLUMNS | (MS_COLUMNS if cohort == "ms" else {}))
    if has_sessions:
        write_json(site_dir / "sessions.json", SESSION_COLUMNS | (MS_SESSION_COLUMNS if cohort == "ms" else {}))
    write_json(site_dir / "sourcedata" / "latents.json", LATENT_COLUMNS)
    write_json(site_dir / "dataset_description.json", {
        "Name": profile.name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["neurofed contributors"],
        "GeneratedBy": [{
            "Name": GENERATOR_NAME,
            "Version": __version__,
            "Description": (f"synthetic {cohort} cohort, seed {seed}, {resolution:g} mm, {n_subjects} subjects, "
                            f"site effect {site_effect:g}, MNI ICBM152 2009 template anatomy; "
                            "recipe and sources in docs/synthetic_data.md"),
        }],
        "SourceDatasets": [{"URL": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
                            "Version": "ICBM152 2009 nonlinear, as shipped with nilearn"}],
        "HowToAcknowledge": "Synthetic data: cite the MNI ICBM152 2009 template (Fonov et al. 2011) if used.",
    })
    (site_dir / "README").write_text(
        f"Synthetic {cohort} brain MRI site '{profile.name}' written by {GENERATOR_NAME}.\n\n"
        "Anatomy derives from the MNI ICBM152 2009 template; ages, scores, lesions and scanner effects are "
        "simulated. No image was acquired from a person.\n\n"
        "sourcedata/latents.tsv holds the true simulated variables of every scan (the answer key used by "
        "benchmarks/synth_signal.py); a model should not read it.\n")
