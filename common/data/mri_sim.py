"""Physics-based multi-contrast brain MRI simulator driven by tissue probability maps.

Each voxel is a mixture of tissues with fractions ``p_k`` (the maps sum to one). The noise-free
signal of a sequence is the fraction-weighted sum of the per-tissue steady-state signals
(Bloch-equation closed forms, e.g. Haacke et al., *Magnetic Resonance Imaging: Physical
Principles and Sequence Design*, 1999, ch. 8 and 15):

- spin echo (T1w, T2w, PDw): ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)``
- inversion recovery (FLAIR, magnitude): ``S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``

The tissue maps are SPM's OldSeg priors (``grey.nii``, ``white.nii``, ``csf.nii``; 91x109x91 at
2 mm, the avg152 grid) for the brain; the non-brain remainder ``1 - (GM + WM + CSF)`` is split into
bone, soft tissue (scalp) and air in the proportions of SPM's ``TPM.nii`` classes 4-6, resampled
onto the same grid. Per subject, T1 and T2 of all tissues share a random factor (+-10 %) and
each PD/T1/T2 gets its own small jitter (+-3 %) around the 1.5 T values below
(:func:`sample_tissues`), acquisition parameters are drawn from :data:`SEQUENCE_RANGES`, and the
image is blurred by a small Gaussian point-spread function, multiplied by a smooth receive-coil
bias field shared by the subject's contrasts, corrupted by Rician noise and scaled to [0, 1] by
its 99.5th percentile.

Tissue values (1.5 T, ms), from the project's data notes (rough literature values, cf. Stanisz
et al., MRM 54:507-512, 2005 for brain; scalp/bone values are coarse mixtures chosen only to give
a plausible head outline): GM PD 0.80 T1 1100 T2 95; WM PD 0.70 T1 650 T2 75; CSF PD 1.00 T1 4000
T2 2000; bone PD 0.05 T1 500 T2 20; soft tissue PD 0.90 T1 400 T2 70; air 0.

Structure-specific tissue (:func:`apply_structures`): inside each structure of SPM12's
Neuromorphometrics atlas (left/right merged) the GM/WM PD, T1 and T2 are scaled and part of the
tissue is exchanged with CSF, by four numbers per structure fitted to the real avg152 images
(:mod:`common.data.mri_sim_calibration`, table :data:`STRUCTURE_TABLE`): e.g. putamen T2 x0.78
(iron), ventricle labels CSF-like, cortical parcels with less sulcal CSF than the population
priors. The demo cohort deforms the atlas labels with the priors.

Agreement with the real SPM avg152 images: Pearson r inside the brain mask (GM+WM+CSF > 0.5) on
the undeformed priors, noise-free signal with the mean tissue values and the centre of each
acquisition range (:func:`reference_correlations`; linear ceilings from
:func:`common.data.mri_sim_calibration.ceilings`):

=====  ======================  ==============  ===============  =================================
       acquisition (ms)        r, structures   r, priors only   least-squares ceiling: priors /
                               (PSF 0.5 vx)    (PSF 0.5 vx)     priors + one value per structure
=====  ======================  ==============  ===============  =================================
T1w    SE TR 500 TE 15         0.956           0.942            0.962 / 0.971
T2w    SE TR 2500 TE 80        0.721           0.617            0.615 / 0.721
PDw    SE TR 3000 TE 15        0.796           0.733            0.738 / 0.799
=====  ======================  ==============  ===============  =================================

With the random parameters, bias field and noise of the cohort (still undeformed priors), seeds 0-2:
r = 0.905-0.931 (T1w), 0.622-0.647 (T2w), 0.674-0.743 (PDw) with the structures; 0.888-0.924,
0.529-0.567, 0.598-0.688 with the priors only.

What the T2w tuning showed: the CSF T2 barely matters (2000, 1000 and 500 ms give r = 0.617,
0.624 and 0.629 at TR 2500/TE 80), so the physical 2000 ms is kept; what raises r from 0.48 to
0.62 is the shorter TR (CSF, T1 = 4000 ms, then recovers only partly: in the average image CSF is
far less dominant than a long-TR T2w predicts, because thin sulcal CSF is averaged away) and the
shorter TE. Without blur, any model linear in the three brain priors tops out at r = 0.61 for T2w and 0.74 for
PDw (least-squares fit of the real image on GM/WM/CSF inside the mask), so the remaining gap is the
mismatch between the priors and the average images, not the signal equations: the structure-specific
values above address that mismatch (T2w 0.62 -> 0.72, PDw 0.73 -> 0.80). Simulated FLAIR has
no real reference in the data: its parameters null CSF (see :data:`SEQUENCE_RANGES`) and keep
GM > WM > CSF, as clinical FLAIR shows.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.data.deform import spline_upsample
from common.data.fetch import fetch_source

__all__ = [
    "TISSUE_NAMES",
    "Tissue",
    "TISSUES",
    "Sequence",
    "SEQUENCE_RANGES",
    "CONTRASTS",
    "load_tissue_maps",
    "brain_mask",
    "TISSUE_LABELS",
    "tissue_labels",
    "sample_tissues",
    "sample_sequences",
    "reference_sequences",
    "sequence_signal",
    "bias_field",
    "add_rician_noise",
    "normalise_percentile",
    "quantise",
    "simulate_subject",
    "reference_correlations",
    "STRUCTURE_TABLE",
    "load_structure_labels",
    "structure_modifiers",
    "modifiers_of",
    "apply_structures",
    "TISSUE_HU",
    "ct_like",
]

#: Order of the channels of the tissue-map array (channels last).
TISSUE_NAMES: tuple[str, ...] = ("gm", "wm", "csf", "bone", "soft", "air")

#: Contrasts the simulator produces.
CONTRASTS: tuple[str, ...] = ("t1", "t2", "pd", "flair")


@dataclass(frozen=True)
class Tissue:
    """Relaxation parameters of one tissue (times in ms, PD relative to water)."""

    pd: float
    t1: float
    t2: float


#: Mean 1.5 T tissue parameters (see the module docstring for sources). Air has no signal.
TISSUES: dict[str, Tissue] = {
    "gm": Tissue(pd=0.80, t1=1100.0, t2=95.0),
    "wm": Tissue(pd=0.70, t1=650.0, t2=75.0),
    "csf": Tissue(pd=1.00, t1=4000.0, t2=2000.0),
    "bone": Tissue(pd=0.05, t1=500.0, t2=20.0),
    "soft": Tissue(pd=0.90, t1=400.0, t2=70.0),
}


#: Typical CT numbers (HU) of the same tissues, for the CT-like image of :func:`ct_like` (brain
#: tissues about 20-40 HU, CSF near water, cortical bone about 1000 HU, air -1000 HU).
TISSUE_HU: dict[str, float] = {"gm": 37.0, "wm": 30.0, "csf": 15.0, "bone": 1000.0, "soft": 40.0, "air": -1000.0}


def ct_like(maps: np.ndarray) -> np.ndarray:
    """CT-like image in HU: the tissue fractions ``(X, Y, Z, 6)`` weighted by :data:`TISSUE_HU`.

    Noise-free and deterministic (no random draws), so adding it to a cohort leaves every MR image
    of that cohort unchanged. It gives the skull and the brain/air boundaries a CT shows, which is
    what an MR/CT fusion needs; it is no CT simulation (no beam hardening, noise or partial-volume
    blur beyond the maps' own).
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[-1] != len(TISSUE_NAMES):
        raise ValueError(f"tissue maps need {len(TISSUE_NAMES)} channels (last axis), got shape {maps.shape}")
    hu = np.asarray([TISSUE_HU[t] for t in TISSUE_NAMES], dtype=np.float32)
    weight = np.maximum(maps.sum(axis=-1), 1e-6)
    return (maps @ hu / weight).astype(np.float32)


@dataclass(frozen=True)
class Sequence:
    """One acquisition: ``kind`` is ``"se"`` (spin echo) or ``"ir"`` (inversion recovery)."""

    kind: str
    tr: float
    te: float
    ti: float = 0.0


#: Uniform ranges (ms) of the random acquisition parameters per contrast. T1w/PDw/T2w are clinical
#: 1.5 T spin-echo ranges; the T2w range (shorter TR and TE) comes from the tuning above. FLAIR's TI range
#: brackets the CSF null ``TI = T1_csf ln(2 / (1 + exp(-TR/T1_csf)))`` (about 2370 ms for
#: TR 9000, T1 4000), so CSF is dark but not exactly nulled in every subject.
SEQUENCE_RANGES: dict[str, dict[str, object]] = {
    "t1": {"kind": "se", "tr": (400.0, 600.0), "te": (10.0, 20.0)},
    "t2": {"kind": "se", "tr": (2200.0, 2800.0), "te": (70.0, 90.0)},
    "pd": {"kind": "se", "tr": (2500.0, 3500.0), "te": (10.0, 20.0)},
    "flair": {"kind": "ir", "tr": (8000.0, 10000.0), "te": (110.0, 150.0), "ti": (2200.0, 2600.0)},
}

_PERCENTILE = 99.5


@functools.lru_cache(maxsize=None)
def _spm_dir(root: str | None) -> Path:
    """Verified SPM folder; cached because verifying hashes all members (TPM.nii is 48 MB)."""
    return fetch_source("spm", root)


def _spm(name: str, root: str | os.PathLike | None) -> Path:
    return _spm_dir(None if root is None else str(root)) / name


def _load(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _on_grid(volume: np.ndarray, volume_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray, **kwargs) -> np.ndarray:
    """``volume`` (on the grid of ``volume_affine``) sampled at the voxel centres of the grid ``shape``/``affine``
    (``kwargs``: ``order``, ``mode``, ``cval`` of ``ndimage.map_coordinates``)."""
    vox2vox = np.linalg.inv(volume_affine) @ affine
    grid = np.indices(shape[:3], dtype=np.float64).reshape(3, -1)
    coords = vox2vox[:3, :3] @ grid + vox2vox[:3, 3:4]
    return ndimage.map_coordinates(volume, coords, **kwargs).reshape(shape[:3])


def load_tissue_maps(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tissue fractions on the 2 mm avg152 grid.

    Args:
        root: demo-data cache root passed to :func:`common.data.fetch.fetch_source`.

    Returns:
        ``(maps, affine)``: ``maps`` is float32 ``(91, 109, 91, 6)`` with channels
        :data:`TISSUE_NAMES`, non-negative and summing to one in every voxel; ``affine`` is the SPM
        2 mm affine.
    """
    gm, affine = _load(_spm("grey.nii", root))
    wm, _ = _load(_spm("white.nii", root))
    csf, _ = _load(_spm("csf.nii", root))
    tpm_img = nib.load(str(_spm("TPM.nii", root)))
    tpm = np.asarray(tpm_img.dataobj, dtype=np.float32)

    # TPM is 1.5 mm on a different grid: sample it at our voxel centres
    outside = [_on_grid(tpm[..., k], tpm_img.affine, gm.shape, affine, order=1, mode="nearest") for k in (3, 4, 5)]
    brain = np.stack([gm, wm, csf], axis=-1).clip(0.0, 1.0)
    total = brain.sum(axis=-1, keepdims=True)
    brain = brain / np.maximum(total, 1.0)  # the priors sum to at most 1.004: renormalise those voxels
    rest = 1.0 - brain.sum(axis=-1, keepdims=True)
    other = np.stack(outside, axis=-1).clip(0.0, None)
    other_sum = other.sum(axis=-1, keepdims=True)
    # Where TPM has no mass left (never on this grid, but be safe) call the remainder air.
    other = np.where(other_sum > 1e-6, other / np.maximum(other_sum, 1e-6), np.array([0.0, 0.0, 1.0], np.float32))
    maps = np.concatenate([brain, other * rest], axis=-1).astype(np.float32)
    return maps, affine


def brain_mask(maps: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``GM + WM + CSF > threshold`` as uint8 (the brain mask used for the demo cohort)."""
    return (maps[..., :3].sum(axis=-1) > threshold).astype(np.uint8)


#: Ids of :func:`tissue_labels`.
TISSUE_LABELS: dict[int, str] = {0: "background", 1: "csf", 2: "gm", 3: "wm"}


def tissue_labels(maps: np.ndarray) -> np.ndarray:
    """Hard tissue label map (uint8, :data:`TISSUE_LABELS`): the most probable tissue, with
    bone, soft tissue and air all labelled background."""
    lut = np.array([2, 3, 1, 0, 0, 0], dtype=np.uint8)  # channel order of TISSUE_NAMES
    return lut[np.argmax(maps, axis=-1)]


#: Tissues outside the brain: coarse mixtures (fat, muscle, skin, marrow) whose composition varies between people.
EXTRACEREBRAL_TISSUES: tuple[str, ...] = ("bone", "soft")


def sample_tissues(
    rng: np.random.Generator, global_jitter: float = 0.10, tissue_jitter: float = 0.03,
    extracerebral_jitter: float | None = None,
) -> dict[str, Tissue]:
    """Per-subject tissue parameters around :data:`TISSUES`.

    T1 and T2 of all tissues are scaled by one subject-wide factor ``U(1 -+ global_jitter)`` each
    (scanner calibration, temperature and age shift tissues together), then every PD, T1 and T2
    by its own ``U(1 -+ tissue_jitter)``. Independent +-10 % per tissue would swap the GM/WM order
    of FLAIR in about 16 % of subjects, which real 1.5 T FLAIR does not show. ``extracerebral_jitter``
    (``None``: ``tissue_jitter``) replaces ``tissue_jitter`` for :data:`EXTRACEREBRAL_TISSUES`, whose
    fat/muscle/marrow mixture varies far more between heads than brain tissue does; the draws are
    the same in number and order either way, so the brain's values do not change with it.
    """
    g_t1, g_t2 = rng.uniform(1.0 - global_jitter, 1.0 + global_jitter, size=2)
    out = {}
    for name, t in TISSUES.items():
        jitter = extracerebral_jitter if extracerebral_jitter is not None and name in EXTRACEREBRAL_TISSUES else tissue_jitter
        j = rng.uniform(1.0 - jitter, 1.0 + jitter, size=3)
        out[name] = Tissue(pd=t.pd * j[0], t1=t.t1 * g_t1 * j[1], t2=t.t2 * g_t2 * j[2])
    return out


def sample_sequences(rng: np.random.Generator, contrasts: tuple[str, ...] = CONTRASTS) -> dict[str, Sequence]:
    """Random acquisition parameters, uniform in :data:`SEQUENCE_RANGES`."""
    out = {}
    for c in contrasts:
        r = SEQUENCE_RANGES[c]
        tr, te = rng.uniform(*r["tr"]), rng.uniform(*r["te"])  # type: ignore[misc]
        ti = rng.uniform(*r["ti"]) if "ti" in r else 0.0  # type: ignore[misc]
        out[c] = Sequence(kind=str(r["kind"]), tr=float(tr), te=float(te), ti=float(ti))
    return out


def reference_sequences(contrasts: tuple[str, ...] = CONTRASTS) -> dict[str, Sequence]:
    """The centre of every range of :data:`SEQUENCE_RANGES` (used to report correlations)."""
    out = {}
    for c in contrasts:
        r = SEQUENCE_RANGES[c]
        mid = lambda key: float(np.mean(r[key])) if key in r else 0.0  # noqa: E731
        out[c] = Sequence(kind=str(r["kind"]), tr=mid("tr"), te=mid("te"), ti=mid("ti"))
    return out


def sequence_signal(
    maps: np.ndarray, tissues: dict[str, Tissue], seq: Sequence, scales: np.ndarray | None = None
) -> np.ndarray:
    """Noise-free magnitude signal of ``seq`` for the tissue mixture ``maps`` (channels last, any
    leading shape). ``scales`` (leading shape of ``maps`` + 3): per-voxel factors on PD, T1 and T2 of
    GM and WM (structure-specific values, :func:`apply_structures`)."""
    out = np.zeros(maps.shape[:-1], dtype=np.float32)
    for k, name in enumerate(TISSUE_NAMES):
        if name not in tissues:  # air
            continue
        t = tissues[name]
        pd, t1, t2 = (np.float32(t.pd), np.float32(t.t1), np.float32(t.t2))
        if scales is not None and name in STRUCTURE_TISSUES:
            pd, t1, t2 = pd * scales[..., 0], t1 * scales[..., 1], t2 * scales[..., 2]
        if seq.kind == "se":
            longitudinal = 1.0 - np.exp(-seq.tr / t1)
        elif seq.kind == "ir":
            longitudinal = np.abs(1.0 - 2.0 * np.exp(-seq.ti / t1) + np.exp(-seq.tr / t1))
        else:
            raise ValueError(f"unknown sequence kind '{seq.kind}'; expected 'se' or 'ir'")
        weight = (pd * longitudinal * np.exp(-seq.te / t2)).astype(np.float32)
        out += weight * maps[..., k]
    return out


#: Contrasts whose signal uses the structure-specific factors: the three the factors were fitted on. FLAIR has no
#: real reference to fit them on, and with them its GM/WM order flipped in some subjects (WM brighter than GM,
#: which clinical FLAIR does not show), so it keeps the mean tissue values; the partial-volume shift (anatomy)
#: applies to every contrast.
CALIBRATED_CONTRASTS: tuple[str, ...] = ("t1", "t2", "pd")

#: Tissues whose values vary by structure (:func:`apply_structures`).
STRUCTURE_TISSUES: tuple[str, ...] = ("gm", "wm")

#: Structure-specific tissue values, fitted by :mod:`common.data.mri_sim_calibration` (its docstring says how).
STRUCTURE_TABLE = Path(__file__).with_name("brain_structure_tissues.json")


def load_structure_labels(root: str | os.PathLike | None = None) -> np.ndarray:
    """SPM12's Neuromorphometrics maximum-probability labels (``tpm/labels_Neuromorphometrics.nii``,
    CC BY-NC) on the 2 mm avg152 grid (nearest neighbour), int16 ``(91, 109, 91)``; 0 = unlabelled."""
    grey, affine = _load(_spm("grey.nii", root))
    img = nib.load(str(_spm("labels_Neuromorphometrics.nii", root)))
    labels = np.asarray(img.dataobj).astype(np.int16)
    return _on_grid(labels, img.affine, grey.shape, affine, order=0, mode="constant", cval=0).astype(np.int16)


@functools.lru_cache(maxsize=None)
def structure_modifiers() -> dict[int, tuple[float, float, float, float]]:
    """Label index -> ``(pd, t1, t2, d)`` of :data:`STRUCTURE_TABLE`: factors on PD/T1/T2 of GM and WM, and
    the partial-volume shift ``d`` of :func:`apply_structures`. Unlisted labels: ``(1, 1, 1, 0)``."""
    import json

    return modifiers_of(json.loads(STRUCTURE_TABLE.read_text())["structures"])


def modifiers_of(structures: dict[str, dict]) -> dict[int, tuple[float, float, float, float]]:
    """Label index -> ``(pd, t1, t2, d)`` from a table's ``structures`` (name -> ``labels``, ``pd_t1_t2_d``)."""
    return {int(i): tuple(float(x) for x in s["pd_t1_t2_d"]) for s in structures.values() for i in s["labels"]}  # type: ignore[misc]


def apply_structures(
    maps: np.ndarray, labels: np.ndarray, modifiers: dict[int, tuple[float, float, float, float]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Structure-specific tissue: ``(maps', scales)`` for tissue fractions ``maps`` (channels last) and the
    structure label of every voxel (``labels``, same leading shape).

    In a structure with modifiers ``(pd, t1, t2, d)``: a fraction ``d`` of its GM+WM becomes CSF (``d < 0``:
    a fraction ``-d`` of its CSF becomes GM and WM in their proportions; partial volume the population priors
    blur away), and ``scales = (pd, t1, t2)`` multiply the GM and WM values of :func:`sequence_signal` (deep
    grey nuclei, cerebellum, brainstem differ from cortex). The fractions still sum to one.
    """
    modifiers = structure_modifiers() if modifiers is None else modifiers
    lut = np.tile(np.array([1.0, 1.0, 1.0, 0.0], dtype=np.float32), (int(max(labels.max(), max(modifiers, default=0))) + 1, 1))
    for k, v in modifiers.items():
        lut[k] = v
    per_voxel = lut[np.clip(labels, 0, None).astype(np.intp)]
    d = per_voxel[..., 3]
    maps = np.array(maps, dtype=np.float32, copy=True)
    tissue = maps[..., 0] + maps[..., 1]
    csf = maps[..., 2]
    moved = np.where(d >= 0, d * tissue, d * csf)  # into CSF (negative: out of CSF)
    keep = np.where(tissue > 1e-9, 1.0 - moved / np.maximum(tissue, 1e-9), 1.0)
    maps[..., 0] *= keep
    maps[..., 1] *= keep
    maps[..., 2] = csf + moved
    # a CSF-to-tissue move where the voxel has no GM/WM at all: give it to GM
    maps[..., 0] += np.where(tissue <= 1e-9, -np.minimum(moved, 0.0), 0.0)
    return maps, per_voxel[..., :3].astype(np.float32)


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float = 0.05, n_ctrl: int = 4) -> np.ndarray:
    """Smooth multiplicative receive-field inhomogeneity ``exp(f)``, ``f`` cubic-spline smooth.

    ``f`` has control values ``N(0, strength)`` on an ``n_ctrl**3`` grid, so the field varies by
    roughly +-``strength`` (relative) across the head. The default 5 % is a mild 1.5 T head-coil
    field: at 15 % the field is as large as the 20 % GM/WM contrast of T1w and drowns it
    (r with avg152T1 falls from 0.93 to 0.87 on the undeformed priors).
    """
    coarse = rng.normal(0.0, strength, size=(n_ctrl,) * 3)
    return np.exp(spline_upsample(coarse, shape[:3])).astype(np.float32)


def add_rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (Rician statistics, Gudbjartsson and
    Patz, MRM 34:910-914, 1995)."""
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def normalise_percentile(image: np.ndarray, percentile: float = _PERCENTILE) -> np.ndarray:
    """Scale so the ``percentile`` maps to 1 and clip to [0, 1] (as the bundles' transforms do)."""
    hi = float(np.percentile(image, percentile))
    lo = float(image.min())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def quantise(image: np.ndarray, bits: int = 12) -> np.ndarray:
    """Round a [0, 1] image to multiples of ``2**-bits`` (exact in float32), as a scanner storing
    ``bits``-bit magnitudes would. The step (2.4e-4 for 12 bits) is far below the noise, and the
    zeroed low mantissa bits make the gzip-compressed NIfTI about half as large and faster to write."""
    scale = float(2**bits)
    return (np.round(np.asarray(image, dtype=np.float32) * scale) / scale).astype(np.float32)


def simulate_subject(
    maps: np.ndarray,
    rng: np.random.Generator,
    contrasts: tuple[str, ...] = CONTRASTS,
    noise: tuple[float, float] = (0.01, 0.03),
    psf_sigma: tuple[float, float] = (0.3, 0.7),
    bias_strength: float = 0.05,
    scales: np.ndarray | None = None,
    extracerebral_jitter: float | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Simulate every contrast of one subject.

    Args:
        maps: tissue fractions ``(X, Y, Z, 6)`` (e.g. deformed output of :func:`load_tissue_maps`).
        rng: seeded generator; the draws are made in a fixed order so a seed gives one subject.
        contrasts: subset of :data:`CONTRASTS`.
        noise: range of the Rician noise sigma relative to the 99.5th percentile of the
            noise-free image.
        psf_sigma: range of the Gaussian point-spread-function sigma in voxels.
        bias_strength: see :func:`bias_field`; one field per subject, shared by its contrasts
            because it comes from the receive coil.
        scales: structure-specific factors on the GM/WM values (from :func:`apply_structures`, whose
            adjusted maps are then ``maps``), used for :data:`CALIBRATED_CONTRASTS`; ``None``: the same
            values everywhere.
        extracerebral_jitter: see :func:`sample_tissues` (``None``: the brain tissues' jitter).

    Returns:
        ``(images, params)``: float32 images in [0, 1] per contrast (12-bit steps, see
        :func:`quantise`), and the sampled parameters
        (tissues, sequences, noise level, PSF) as plain numbers for provenance.
    """
    tissues = sample_tissues(rng, extracerebral_jitter=extracerebral_jitter)
    seqs = sample_sequences(rng, contrasts)
    bias = bias_field(rng, maps.shape[:3], bias_strength)
    images: dict[str, np.ndarray] = {}
    params: dict[str, object] = {
        "tissues": {k: vars(v) for k, v in tissues.items()},
        "sequences": {},
    }
    for c in contrasts:
        sig = sequence_signal(maps, tissues, seqs[c], scales if c in CALIBRATED_CONTRASTS else None)
        sigma_psf = float(rng.uniform(*psf_sigma))
        sig = ndimage.gaussian_filter(sig, sigma_psf) * bias
        rel_noise = float(rng.uniform(*noise))
        scale = float(np.percentile(sig, _PERCENTILE))
        noisy = add_rician_noise(rng, sig, rel_noise * scale)
        images[c] = quantise(normalise_percentile(noisy))
        params["sequences"][c] = {**vars(seqs[c]), "noise": rel_noise, "psf_sigma": sigma_psf}  # type: ignore[index]
    return images, params


def reference_correlations(
    root: str | os.PathLike | None = None,
    psf_sigma: float = 0.5,
    structures: bool | dict[int, tuple[float, float, float, float]] = True,
) -> dict[str, float]:
    """Pearson r inside the brain between noise-free simulated T1w/T2w/PDw and the real avg152
    images, with mean tissue values and the centre of each acquisition range; ``structures``: with the
    structure-specific values of :func:`apply_structures` (as the demo cohort is simulated; a dict: those
    modifiers instead of :data:`STRUCTURE_TABLE`'s)."""
    maps, _ = load_tissue_maps(root)
    mask = brain_mask(maps).astype(bool)
    scales = None
    if structures:
        maps, scales = apply_structures(maps, load_structure_labels(root), None if structures is True else structures)
    seqs = reference_sequences(("t1", "t2", "pd"))
    out = {}
    for c, key in (("t1", "avg152T1.nii"), ("t2", "avg152T2.nii"), ("pd", "avg152PD.nii")):
        real, _ = _load(_spm(key, root))
        sim = ndimage.gaussian_filter(sequence_signal(maps, TISSUES, seqs[c], scales), psf_sigma)
        out[c] = float(np.corrcoef(sim[mask], real[mask])[0, 1])
    return out
