"""Build the small demo mask database shipped in ``datasets/demo_mask_db`` from the TotalSegmentator example CT.

Usage (from the bundle folder)::

    python -m scripts.build_mask_db [out_dir]

The example CT and its labels come from the TotalSegmentator 2.18.0 source archive (Apache-2.0), fetched and
hash-checked by ``common.data.fetch``. For real use, point ``mask_db`` at the official
``candidate_masks_flexible_size_and_spacing_4000.json`` (same format) or build one from your own label maps
with ``common.data.maisi_masks.mask_db_entry``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.data.demo import total_class_names
from common.data.fetch import demo_file
from common.data.maisi_masks import build_mask_db


def main(out_dir: str | None = None) -> Path:
    out = Path(out_dir) if out_dir else Path(__file__).resolve().parents[1] / "datasets" / "demo_mask_db"
    return build_mask_db(
        out,
        demo_file("totalsegmentator/example_ct.nii.gz"),
        demo_file("totalsegmentator/example_seg_fast_force_split.nii.gz"),
        total_class_names(),
    )


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
