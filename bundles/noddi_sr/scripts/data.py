"""What a noddi_sr datalist holds: the meaning of each entry, which entries are file paths, how to make one.

Datalists are read by :func:`common.bundle.load_datalist` (every path entry joined to ``dataset_dir``, a missing
datalist gives ``[]`` so that a config parses before the data exist) and a run starts with
:func:`common.bundle.require_cases` (``hint=COHORT_HINT``).
"""

from __future__ import annotations

__all__ = ["ENTRY_MEANING", "PATH_KEYS", "COHORT_HINT"]

#: what each datalist entry holds, for the error messages
ENTRY_MEANING = {
    "dwi": "the path of the low-resolution 4D DWI series (NIfTI)",
    "bval": "the path of the DWI's FSL bval file",
    "bvec": "the path of the DWI's FSL bvec file",
    "mask": "the path of the LR brain mask (3D NIfTI)",
    "noddi": "the path of the HR reference NODDI maps (4D NIfTI with 3 volumes: NDI, ODI, FWF)",
    "mask_hr": "the path of the HR brain mask (3D NIfTI)",
    "wm": "the path of the HR white-matter mask (3D NIfTI)",
    "gm": "the path of the HR grey-matter mask (3D NIfTI)",
    "lowres_fit": "the path of the low-resolution fit on the HR grid (4D NIfTI with 3 volumes)",
    "dwi_hr": "the path of the phantom's HR DWI series (written on request, not read by the bundle)",
}

#: the entries that are file paths (joined to ``dataset_dir``); ``id`` and any other entry are kept as they are
PATH_KEYS = tuple(ENTRY_MEANING)

#: how to make a cohort, appended to the error of a run without cases
COHORT_HINT = (
    "build a phantom cohort (python -m common.data.noddi_phantom <dataset_dir>) or an HCP datalist "
    "(common.data.hcp_datalist), and pass --dataset_dir"
)
