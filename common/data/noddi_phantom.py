"""Semi-synthetic NODDI phantom: HR NODDI maps from real tissue priors, HR DWI from the forward model, LR DWI input.

Recipe (``noddi_sr`` spec §5; the tissue values are approximate literature ranges, a project decision):

1. Tissue priors (real): SPM OldSeg grey/white/csf (2 mm, default) or the ICBM 2009a GM/WM templates shipped with
   nilearn (1 mm; CSF = brain − GM − WM). Resampled (trilinear) to the HR spacing; per synthetic subject a smooth
   random elastic deformation (Gaussian-smoothed displacement, σ 6–8 mm, peak magnitude 2–4 mm) and a jitter of the
   tissue values. Brain mask = p_GM + p_WM + p_CSF ≥ 0.5; the three are renormalised to sum 1 inside it.
2. Maps: WM ν_ic 0.65, ODI 0.15, f_iso 0.02; GM ν_ic 0.40, ODI 0.55, f_iso 0.05; CSF f_iso 1. ν_ic, ODI = p-weighted
   means over WM/GM (0 where p_WM + p_GM < 0.05); f_iso = p_CSF + 0.02 p_WM + 0.05 p_GM; plus Gaussian random fields
   (σ 4 mm) of amplitude 0.05 (ν_ic, ODI) and 0.02 (f_iso); clipped to [0, 1] (ODI to [0.01, 0.99] in tissue).
3. Fibre orientation: i.i.d. Gaussian 3-vectors smoothed per component (σ 6 mm) and normalised.
4. S0 = 1000 (0.70 p_WM + 0.80 p_GM + 1.00 p_CSF); HR DWI = S0 × NODDI attenuation (:class:`common.data.noddi.NODDIModel`).
5. LR DWI = 2×2×2 block average of the HR **signals** (partial volume acts on signals, not on maps), then Rician
   noise |S + σ (n₁ + i n₂)| with σ = 700 / SNR (700 ≈ WM S0). LR affine = A_hr · diag(2, 2, 2, 1) with translation
   A_hr · [½, ½, ½, 1]ᵀ: the LR voxel centre is the mean of its eight HR voxel centres.

Acquisition schemes: ``default`` 6 b0 + 30 @ 1000 + 60 @ 2000 (Fibonacci half-sphere sets), ``hcp`` 18 b0 + 90 × {1000,
2000, 3000}, ``tiny`` 2 b0 + 12 @ 1000 + 12 @ 2000, ``dipy_small_101D`` the real table of dipy's ``small_101D`` with
its b-values binned to shells (:func:`common.data.dwi.bin_shells`).

Everything is drawn from ``numpy.random.default_rng([seed, subject_index])``: the same seed gives identical files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.data.dwi import bin_shells, read_bvals_bvecs, write_bvals_bvecs
from common.data.noddi import ODI_RANGE, NODDIModel

__all__ = [
    "PhantomConfig",
    "fibonacci_directions",
    "acquisition_scheme",
    "load_priors",
    "lr_affine",
    "hr_affine",
    "block_average",
    "make_subject",
    "write_subject",
    "build_phantom_cohort",
]

TISSUE = {  # (nu_ic, ODI, f_iso)
    "wm": (0.65, 0.15, 0.02),
    "gm": (0.40, 0.55, 0.05),
}


@dataclass
class PhantomConfig:
    """Phantom settings; the defaults are the paper-scale phantom of the spec.

    Attributes:
        priors: ``spm_oldseg`` (2 mm) or ``nilearn_icbm`` (1 mm).
        hr_spacing: HR voxel size in mm.
        hr_shape: HR grid shape (even numbers; centre crop or pad of the resampled priors); None keeps the whole
            field of view (trimmed to even sizes).
        scheme: acquisition scheme name (module docstring).
        snr: LR signal-to-noise ratio; σ = 700 / snr. 0 or None = no noise.
        snr_range: (low, high): each subject draws its SNR uniformly from this range instead (a cohort that covers
            the noise levels of real scanners); drawn from its own stream, so the other random fields of a subject
            do not change with it.
        deform: random elastic deformation per subject (off for a subject that should match the template).
        deform_sigma_mm, deform_magnitude_mm: ranges of the smoothing and peak displacement.
        jitter: relative uniform jitter of the tissue values per subject.
        grf_sigma_mm, fibre_sigma_mm: smoothing of the random fields.
        write_hr_dwi: also write the noise-free HR DWI (for the fitting-floor baseline).
    """

    priors: str = "spm_oldseg"
    hr_spacing: float = 2.0
    hr_shape: tuple[int, int, int] | None = None
    scheme: str = "default"
    snr: float | None = 30.0
    snr_range: tuple[float, float] | None = None
    deform: bool = True
    deform_sigma_mm: tuple[float, float] = (6.0, 8.0)
    deform_magnitude_mm: tuple[float, float] = (2.0, 4.0)
    jitter: float = 0.05
    grf_sigma_mm: float = 4.0
    fibre_sigma_mm: float = 6.0
    write_hr_dwi: bool = False
    extra: dict = field(default_factory=dict)


def fibonacci_directions(n: int, rotation_seed: int | None = None) -> np.ndarray:
    """``n`` near-uniform unit vectors on the upper half sphere (Fibonacci lattice), optionally randomly rotated."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n  # half sphere: z in (0, 1)
    phi = np.pi * (1.0 + 5**0.5) * i
    r = np.sqrt(1.0 - z * z)
    g = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    if rotation_seed is not None:
        q, _ = np.linalg.qr(np.random.default_rng(rotation_seed).normal(size=(3, 3)))
        g = g @ q.T
    return g


def acquisition_scheme(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(bvals (N,), bvecs (N, 3)) of a named scheme (module docstring)."""
    def shells(n_b0, spec):
        bvals = [np.zeros(n_b0)]
        bvecs = [np.zeros((n_b0, 3))]
        for k, (b, n) in enumerate(spec):
            bvals.append(np.full(n, float(b)))
            bvecs.append(fibonacci_directions(n, rotation_seed=k))  # different sets per shell
        return np.concatenate(bvals), np.concatenate(bvecs)

    if name == "default":
        return shells(6, [(1000, 30), (2000, 60)])
    if name == "hcp":
        return shells(18, [(1000, 90), (2000, 90), (3000, 90)])
    if name == "tiny":
        return shells(2, [(1000, 12), (2000, 12)])
    if name == "dipy_small_101D":
        from common.data.fetch import demo_file

        t = read_bvals_bvecs(demo_file("dipy/small_101D.bval"), demo_file("dipy/small_101D.bvec"))
        return bin_shells(t.bvals), t.bvecs
    raise ValueError(f"unknown acquisition scheme '{name}'; expected default, hcp, tiny or dipy_small_101D")


def _resample_matrix(affine: np.ndarray, factor: float) -> np.ndarray:
    return affine @ np.diag([factor, factor, factor, 1.0])


def load_priors(source: str = "spm_oldseg") -> tuple[np.ndarray, np.ndarray]:
    """(priors (3, X, Y, Z) = GM, WM, CSF probabilities in [0, 1], affine) from the real templates."""
    from common.data.fetch import demo_file

    if source == "spm_oldseg":
        imgs = [nib.load(demo_file(f"spm/{k}.nii")) for k in ("grey", "white", "csf")]
        arrs = [np.asarray(i.dataobj, dtype=np.float32) for i in imgs]
    elif source == "nilearn_icbm":
        imgs = [nib.load(demo_file(f"nilearn/mni152_{k}_1mm.nii.gz")) for k in ("gm", "wm")]
        arrs = [np.asarray(i.dataobj, dtype=np.float32) for i in imgs]
        arrs = [a / 255.0 if a.max() > 1.5 else a for a in arrs]
        tissue = arrs[0] + arrs[1]
        brain = ndimage.binary_fill_holes(ndimage.binary_closing(tissue > 0.2, iterations=3))
        arrs.append(np.clip(brain.astype(np.float32) - tissue, 0.0, 1.0))
    else:
        raise ValueError(f"unknown prior source '{source}'; expected spm_oldseg or nilearn_icbm")
    return np.clip(np.stack(arrs), 0.0, 1.0), imgs[0].affine.astype(np.float64)


def lr_affine(affine_hr: np.ndarray, scale: int = 2) -> np.ndarray:
    """A_lr = A_hr · diag(s, s, s, 1), translated by A_hr · [(s−1)/2, …, 1]ᵀ (LR centre = mean of its HR centres)."""
    out = affine_hr @ np.diag([scale, scale, scale, 1.0])
    out[:3, 3] = (affine_hr @ np.array([(scale - 1) / 2] * 3 + [1.0]))[:3]
    return out


def hr_affine(affine_lr: np.ndarray, scale: int = 2) -> np.ndarray:
    """Inverse of :func:`lr_affine`: A_hr = A_lr · diag(1/s, …, 1) translated by A_lr · [−(s−1)/(2s), …, 1]ᵀ."""
    out = affine_lr @ np.diag([1.0 / scale] * 3 + [1.0])
    out[:3, 3] = (affine_lr @ np.array([-(scale - 1) / (2 * scale)] * 3 + [1.0]))[:3]
    return out


def block_average(x: np.ndarray, scale: int = 2) -> np.ndarray:
    """Mean over non-overlapping scale³ blocks of the last three axes (sizes must be multiples of ``scale``)."""
    *lead, nx, ny, nz = x.shape
    if nx % scale or ny % scale or nz % scale:
        raise ValueError(f"spatial shape {(nx, ny, nz)} is not a multiple of {scale}")
    y = x.reshape(*lead, nx // scale, scale, ny // scale, scale, nz // scale, scale)
    return y.mean(axis=(-5, -3, -1))


def _smooth_field(rng: np.random.Generator, shape, sigma_vox: float, n: int = 1) -> np.ndarray:
    """``n`` Gaussian random fields with unit standard deviation (Gaussian-smoothed white noise)."""
    out = np.empty((n, *shape), dtype=np.float32)
    for i in range(n):
        f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
        out[i] = f / max(float(f.std()), 1e-8)
    return out


def _hr_grid(priors: np.ndarray, affine: np.ndarray, cfg: PhantomConfig):
    """Coordinates (in prior voxels) of the HR grid and its affine."""
    src_spacing = float(np.sqrt((affine[:3, :3] ** 2).sum(0)).mean())
    factor = cfg.hr_spacing / src_spacing
    full = [int(np.floor((s - 1) / factor)) + 1 for s in priors.shape[1:]]
    shape = list(cfg.hr_shape) if cfg.hr_shape is not None else [s - s % 2 for s in full]
    if any(s % 2 for s in shape):
        raise ValueError(f"hr_shape {shape} must be even (2× block averaging)")
    start = [(f - s) // 2 for f, s in zip(full, shape)]  # centre crop (negative = pad)
    aff = _resample_matrix(affine, factor)
    aff[:3, 3] = (aff @ np.array(start + [1.0]))[:3]
    grid = np.stack(np.meshgrid(*[factor * (np.arange(s) + o) for s, o in zip(shape, start)], indexing="ij"))
    return grid.astype(np.float32), aff, src_spacing


def subject_snr(index: int, seed: int, cfg: PhantomConfig) -> float | None:
    """The SNR of subject ``index``: ``cfg.snr``, or a uniform draw from ``cfg.snr_range`` (own random stream)."""
    if cfg.snr_range is None:
        return cfg.snr
    lo, hi = (float(v) for v in cfg.snr_range)
    if not 0 < lo <= hi:
        raise ValueError(f"snr_range {cfg.snr_range} must be two positive numbers, low <= high")
    return float(np.random.default_rng([int(seed), int(index), 1]).uniform(lo, hi))


def make_subject(index: int, seed: int = 0, cfg: PhantomConfig | None = None, priors=None) -> dict[str, np.ndarray]:
    """One synthetic subject: HR maps, masks, fibre field, HR and LR DWI, gradient table and affines.

    Returns a dict with ``noddi_hr`` (3, X, Y, Z: NDI, ODI, FWF), ``mask_hr``, ``wm_hr``, ``gm_hr`` (X, Y, Z uint8),
    ``fibre_dir_hr`` (3, X, Y, Z), ``dwi_hr`` (N, X, Y, Z noise-free), ``dwi_lr`` (N, X/2, Y/2, Z/2 with noise),
    ``mask_lr``, ``bvals``, ``bvecs``, ``affine_hr``, ``affine_lr``, ``sigma``.
    """
    cfg = cfg or PhantomConfig()
    rng = np.random.default_rng([int(seed), int(index)])
    pri, aff_src = priors if priors is not None else load_priors(cfg.priors)
    grid, aff_hr, src_spacing = _hr_grid(pri, aff_src, cfg)
    shape = grid.shape[1:]
    vox_mm = cfg.hr_spacing
    if cfg.deform:
        sig = rng.uniform(*cfg.deform_sigma_mm) / vox_mm
        mag = rng.uniform(*cfg.deform_magnitude_mm)
        disp = _smooth_field(rng, shape, sig, 3)
        disp *= mag / max(float(np.sqrt((disp**2).sum(0)).max()), 1e-8)  # peak displacement = mag mm
        grid = grid + disp / src_spacing
    p = np.stack([ndimage.map_coordinates(pri[c], grid, order=1, mode="constant", cval=0.0) for c in range(3)])
    p = np.clip(p, 0.0, 1.0)
    total = p.sum(0)
    mask = total >= 0.5
    p = np.where(mask[None], p / np.maximum(total, 1e-6)[None], 0.0)
    pg, pw, pc = p
    jit = lambda v: v * (1.0 + rng.uniform(-cfg.jitter, cfg.jitter))  # noqa: E731
    wm = [jit(v) for v in TISSUE["wm"]]
    gm = [jit(v) for v in TISSUE["gm"]]
    tissue = pw + pg
    has_tissue = tissue >= 0.05
    denom = np.maximum(tissue, 1e-6)
    grf = _smooth_field(rng, shape, cfg.grf_sigma_mm / vox_mm, 3)
    ndi = np.where(has_tissue, (pw * wm[0] + pg * gm[0]) / denom + 0.05 * grf[0], 0.0)
    odi = np.where(has_tissue, (pw * wm[1] + pg * gm[1]) / denom + 0.05 * grf[1], 0.0)
    fwf = pc + wm[2] * pw + gm[2] * pg + 0.02 * grf[2]
    ndi = np.where(mask, np.clip(ndi, 0.0, 1.0), 0.0)
    odi = np.where(mask & has_tissue, np.clip(odi, *ODI_RANGE), 0.0)
    fwf = np.where(mask, np.clip(fwf, 0.0, 1.0), 0.0)
    mu = _smooth_field(rng, shape, cfg.fibre_sigma_mm / vox_mm, 3)
    mu /= np.maximum(np.sqrt((mu**2).sum(0, keepdims=True)), 1e-8)
    s0 = 1000.0 * (0.70 * pw + 0.80 * pg + 1.00 * pc)

    bvals, bvecs = acquisition_scheme(cfg.scheme)
    model = NODDIModel(bvals, bvecs)
    dwi_hr = np.zeros((bvals.size, *shape), dtype=np.float32)
    idx = np.flatnonzero(mask.reshape(-1))
    flat = dwi_hr.reshape(bvals.size, -1)
    for chunk in np.array_split(idx, max(1, idx.size // 20000 + 1)):
        att = model(ndi.reshape(-1)[chunk], odi.reshape(-1)[chunk], fwf.reshape(-1)[chunk], mu.reshape(3, -1)[:, chunk].T)
        flat[:, chunk] = (s0.reshape(-1)[chunk][:, None] * att).T
    dwi_lr = block_average(dwi_hr.astype(np.float64), 2)
    snr = subject_snr(index, seed, cfg)
    sigma = 0.0 if not snr else 700.0 / float(snr)
    if sigma > 0:
        n1 = rng.standard_normal(dwi_lr.shape)
        n2 = rng.standard_normal(dwi_lr.shape)
        dwi_lr = np.sqrt((dwi_lr + sigma * n1) ** 2 + (sigma * n2) ** 2)
    mask_lr = block_average(mask.astype(np.float32), 2) >= 0.5
    return {
        "noddi_hr": np.stack([ndi, odi, fwf]).astype(np.float32),
        "mask_hr": mask.astype(np.uint8),
        "wm_hr": (mask & (pw >= 0.5)).astype(np.uint8),
        "gm_hr": (mask & (pg >= 0.5)).astype(np.uint8),
        "fibre_dir_hr": mu.astype(np.float32),
        "dwi_hr": dwi_hr,
        "dwi_lr": dwi_lr.astype(np.float32),
        "mask_lr": mask_lr.astype(np.uint8),
        "bvals": bvals,
        "bvecs": bvecs,
        "affine_hr": aff_hr,
        "affine_lr": lr_affine(aff_hr, 2),
        "sigma": np.float64(sigma),
        "snr": np.float64(snr or 0.0),
    }


def _save(arr: np.ndarray, affine: np.ndarray, path: Path, channel_first: bool = False) -> None:
    data = np.moveaxis(arr, 0, -1) if channel_first else arr
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, os.fspath(path))


def write_subject(subject: dict[str, np.ndarray], folder: str | os.PathLike, write_hr_dwi: bool = False) -> dict[str, str]:
    """Write one subject's files (spec §5 step 6); returns the datalist entry (paths relative to the parent folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a_hr, a_lr = subject["affine_hr"], subject["affine_lr"]
    _save(subject["dwi_lr"], a_lr, folder / "dwi_lr.nii.gz", channel_first=True)
    write_bvals_bvecs(folder / "dwi_lr.bval", folder / "dwi_lr.bvec", subject["bvals"], subject["bvecs"])
    _save(subject["mask_lr"], a_lr, folder / "mask_lr.nii.gz")
    _save(subject["noddi_hr"], a_hr, folder / "noddi_hr.nii.gz", channel_first=True)
    for k in ("mask_hr", "wm_hr", "gm_hr"):
        _save(subject[k], a_hr, folder / f"{k}.nii.gz")
    _save(subject["fibre_dir_hr"], a_hr, folder / "fibre_dir_hr.nii.gz", channel_first=True)
    name = folder.name
    entry = {
        "id": name,
        "dwi": f"{name}/dwi_lr.nii.gz",
        "bval": f"{name}/dwi_lr.bval",
        "bvec": f"{name}/dwi_lr.bvec",
        "mask": f"{name}/mask_lr.nii.gz",
        "noddi": f"{name}/noddi_hr.nii.gz",
        "mask_hr": f"{name}/mask_hr.nii.gz",
        "wm": f"{name}/wm_hr.nii.gz",
        "gm": f"{name}/gm_hr.nii.gz",
    }
    if write_hr_dwi:
        _save(subject["dwi_hr"], a_hr, folder / "dwi_hr.nii.gz", channel_first=True)
        entry["dwi_hr"] = f"{name}/dwi_hr.nii.gz"
    return entry


def _write_one(index: int, seed: int, cfg: PhantomConfig, folder: Path) -> tuple[dict[str, str], float]:
    subject = make_subject(index, seed=seed, cfg=cfg)
    return write_subject(subject, folder, write_hr_dwi=cfg.write_hr_dwi), float(subject["snr"])


def build_phantom_cohort(
    out_dir: str | os.PathLike,
    n_train: int = 8,
    n_val: int = 1,
    n_test: int = 1,
    seed: int = 0,
    cfg: PhantomConfig | None = None,
    datalist_name: str = "datalist.json",
    n_jobs: int = 1,
) -> Path:
    """Write a phantom cohort and its Decathlon datalist; returns the datalist path.

    Subjects ``phantom_000`` … are split in order into ``training``, ``validation`` and ``test`` (the held-out
    phantoms). ``testing`` lists the test subjects in the inference format (dwi, bval, bvec, mask). Each subject
    is a function of (seed, index) only, so ``n_jobs`` worker processes write the same files as one.
    """
    cfg = cfg or PhantomConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = n_train + n_val + n_test
    folders = [out / f"phantom_{i:03d}" for i in range(n)]
    if n_jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_jobs) as pool:
            written = list(pool.map(_write_one, range(n), [seed] * n, [cfg] * n, folders))
    else:
        priors = load_priors(cfg.priors)
        written = []
        for i in range(n):
            subject = make_subject(i, seed=seed, cfg=cfg, priors=priors)
            written.append((write_subject(subject, folders[i], write_hr_dwi=cfg.write_hr_dwi), float(subject["snr"])))
    entries = [e for e, _ in written]
    test = entries[n_train + n_val :]
    datalist = {
        "description": "semi-synthetic NODDI phantom cohort (common.data.noddi_phantom)",
        "phantom_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "seed": int(seed),
        "subject_snr": {e["id"]: snr for e, snr in written},
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": test,
        "testing": [{k: e[k] for k in ("id", "dwi", "bval", "bvec", "mask")} for e in test],
    }
    path = out / datalist_name
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(datalist, indent=2))
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # pragma: no cover - CLI
    import argparse

    ap = argparse.ArgumentParser(description="Write a semi-synthetic NODDI phantom cohort with its datalist.")
    ap.add_argument("out_dir")
    ap.add_argument("--n_train", type=int, default=8)
    ap.add_argument("--n_val", type=int, default=1)
    ap.add_argument("--n_test", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--priors", default="spm_oldseg")
    ap.add_argument("--hr_spacing", type=float, default=2.0)
    ap.add_argument("--hr_shape", type=int, nargs=3, default=None)
    ap.add_argument("--scheme", default="default")
    ap.add_argument("--snr", type=float, default=30.0)
    ap.add_argument("--snr_range", type=float, nargs=2, default=None, help="per-subject SNR drawn from [low, high]")
    ap.add_argument("--deform_magnitude_mm", type=float, nargs=2, default=None, help="peak displacement range (mm)")
    ap.add_argument("--write_hr_dwi", action="store_true")
    ap.add_argument("--n_jobs", type=int, default=1, help="worker processes (same files as one)")
    a = ap.parse_args()
    c = PhantomConfig(
        priors=a.priors,
        hr_spacing=a.hr_spacing,
        hr_shape=tuple(a.hr_shape) if a.hr_shape else None,
        scheme=a.scheme,
        snr=a.snr,
        snr_range=tuple(a.snr_range) if a.snr_range else None,
        write_hr_dwi=a.write_hr_dwi,
        **({"deform_magnitude_mm": tuple(a.deform_magnitude_mm)} if a.deform_magnitude_mm else {}),
    )
    print(build_phantom_cohort(a.out_dir, a.n_train, a.n_val, a.n_test, a.seed, c, n_jobs=a.n_jobs))
