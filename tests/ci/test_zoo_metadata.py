"""The metadata schemas kept in ci/schemas/ accept what the model zoo publishes and reject broken metadata.

Fixtures (tests/ci/zoo_metadata/, see its README) are the structure of published zoo metadata. Each is
validated the way ci/verify_bundle.py check 4 validates a bundle: ``validate_metadata``, i.e. MONAI's
``verify_metadata`` against the offline copy of the schema the metadata's ``schema`` URL names, as the
zoo's ci/prepare_schema.py + ci/verify_bundle.py ``verify_metadata_format`` do with the downloaded file.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import verify_bundle as vb  # noqa: E402
from minimal_bundle import write_minimal_bundle  # noqa: E402

FIXTURES = REPO / "tests" / "ci" / "zoo_metadata"
FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
# required keys of the published meta_schema_20240725.json (MONAI-extra-test-data 0.8.1 release)
REQUIRED_20240725 = ["schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                     "task", "description", "authors", "copyright", "network_data_format"]
TENSOR_REQUIRED = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]
FREE_TEXT = ["name", "task", "description", "authors", "copyright", "data_source", "data_type", "intended_use",
             "image_classes", "label_classes", "pred_classes"]


def _load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _validate(tmp_path: Path, meta: dict) -> Path:
    f = tmp_path / "metadata.json"
    f.write_text(json.dumps(meta))
    return vb.validate_metadata(f)


def _rejected(tmp_path: Path, meta: dict) -> str:
    with pytest.raises(ValueError) as err:
        _validate(tmp_path, meta)
    return str(err.value)


def test_fixtures_cover_ten_zoo_bundles_and_several_schemas():
    assert len(FIXTURE_NAMES) >= 10
    assert {"brats_mri_generative_diffusion", "brats_mri_axial_slices_generative_diffusion", "vista2d",
            "spleen_ct_segmentation", "maisi_ct_generative"} <= set(FIXTURE_NAMES)
    schemas = {_load(n)["schema"].rsplit("/", 1)[1] for n in FIXTURE_NAMES}
    assert {"meta_schema_20240725.json", "meta_schema_20220324.json"} <= schemas


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_is_structure_only(name):
    meta = _load(name)
    for key in FREE_TEXT:
        assert meta.get(key, "<text>") == "<text>", key
    assert set(meta.get("changelog", {}).values()) <= {"<text>"}
    assert set(meta.get("references", [])) <= {"<text>"}
    assert meta["schema"].startswith(URL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_published_zoo_metadata_validates(name):
    schema = vb.validate_metadata(FIXTURES / f"{name}.json")
    assert schema.name == _load(name)["schema"].rsplit("/", 1)[1]


def test_optional_tensor_keys_stay_optional(tmp_path):
    # the two rejections: brats diffusion inputs without channel_def, vista2d's pred without is_patch_data
    brats = _load("brats_mri_generative_diffusion")
    assert "channel_def" not in brats["network_data_format"]["inputs"]["latent"]
    vista = _load("vista2d")
    assert "is_patch_data" not in vista["network_data_format"]["outputs"]["pred"]
    for meta in (brats, vista):
        _validate(tmp_path, meta)
    # also on a tensor that has neither
    meta = copy.deepcopy(vista)
    del meta["network_data_format"]["inputs"]["image"]["is_patch_data"]
    del meta["network_data_format"]["inputs"]["image"]["channel_def"]
    _validate(tmp_path, meta)


@pytest.mark.parametrize("name", BUNDLES)
def test_our_bundles_metadata_validates(name):
    schema = vb.validate_metadata(REPO / "bundles" / name / "configs" / "metadata.json")
    assert schema.name == "meta_schema_20240725.json"


# ------------------------------------------------------------------------------- broken metadata
@pytest.mark.parametrize("key", REQUIRED_20240725)
def test_missing_required_key_is_rejected(tmp_path, key):
    meta = _load("vista2d")
    del meta[key]
    if key == "schema":  # no URL: no schema to pick
        with pytest.raises(ValueError, match="no 'schema' URL"):
            _validate(tmp_path, meta)
    else:
        assert f"'{key}' is a required property" in _rejected(tmp_path, meta)


@pytest.mark.parametrize("key", ["version", "copyright", "required_packages_version", "network_data_format"])
def test_our_bundle_missing_a_required_key_is_rejected(tmp_path, key):
    meta = json.loads((REPO / "bundles" / "diffseg" / "configs" / "metadata.json").read_text())
    del meta[key]
    assert f"'{key}' is a required property" in _rejected(tmp_path, meta)


@pytest.mark.parametrize("value", [["image"], "image", 3, None])
def test_network_data_format_of_wrong_type_is_rejected(tmp_path, value):
    meta = _load("vista2d")
    meta["network_data_format"] = value
    assert "Failed validating" in _rejected(tmp_path, meta)


@pytest.mark.parametrize(
    "path, value",
    [
        (("version",), 1.0),
        (("required_packages_version",), ["torch==2.4.0"]),
        (("references",), "one reference"),
        (("references",), [1]),
        (("network_data_format", "inputs", "image", "num_channels"), "3"),
        (("network_data_format", "inputs", "image", "value_range"), ["min", "max"]),
        (("network_data_format", "inputs", "image", "spatial_shape"), [1.5]),
        (("network_data_format", "inputs", "image", "is_patch_data"), "true"),
        (("network_data_format", "inputs", "image", "channel_def"), ["image"]),
        (("network_data_format", "outputs", "pred"), {"type": "image"}),
        (("network_data_format", "outputs"), []),
    ],
)
def test_wrong_types_are_rejected(tmp_path, path, value):
    meta = _load("vista2d")
    node = meta
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    _rejected(tmp_path, meta)


@pytest.mark.parametrize("key", TENSOR_REQUIRED)
def test_tensor_missing_a_required_key_is_rejected(tmp_path, key):
    meta = _load("vista2d")
    del meta["network_data_format"]["inputs"]["image"][key]
    _rejected(tmp_path, meta)


@pytest.mark.parametrize("key", ["inputs", "outputs"])
def test_network_io_missing_inputs_or_outputs_is_rejected(tmp_path, key):
    meta = _load("brats_mri_generative_diffusion")
    del meta["network_data_format"][key]
    assert f"'{key}' is a required property" in _rejected(tmp_path, meta)


def test_any_name_data_format_key_must_describe_a_network(tmp_path):
    # meta_schema_20240725 reads every "<name>_data_format" key as network inputs/outputs: a free-form
    # description under such a key fails the zoo's check (bundles/maisi_ct had one)
    meta = _load("brats_mri_generative_diffusion")
    meta["autoencoder_data_format"] = {"image": meta["autoencoder_data_format"]["inputs"]["image"]}
    assert "'inputs' is a required property" in _rejected(tmp_path, meta)


def test_schema_of_2022_requires_its_own_keys(tmp_path):
    meta = _load("spleen_ct_segmentation")
    _validate(tmp_path, meta)
    for path in (("optional_packages_version",), ("network_data_format", "inputs", "image"),
                 ("network_data_format", "outputs", "pred")):
        broken = copy.deepcopy(meta)
        node = broken
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
        assert f"'{path[-1]}' is a required property" in _rejected(tmp_path, broken)
    # a 2022 bundle does not satisfy the 2024 schema (required_packages_version), and vice versa
    assert "'required_packages_version' is a required property" in _rejected(
        tmp_path, {**meta, "schema": URL + "meta_schema_20240725.json"})
    assert "'optional_packages_version' is a required property" in _rejected(
        tmp_path, {**_load("vista3d"), "schema": URL + "meta_schema_20220324.json"})


def test_generator_ldm_schema_requires_both_networks(tmp_path):
    meta = _load("maisi_ct_generative")
    for key in ("autoencoder_data_format", "generator_data_format"):
        broken = copy.deepcopy(meta)
        del broken[key]
        assert f"'{key}' is a required property" in _rejected(tmp_path, broken)
    broken = copy.deepcopy(meta)
    del broken["autoencoder_data_format"]["inputs"]["anatomy_list"]
    assert "'anatomy_list' is a required property" in _rejected(tmp_path, broken)


def test_unknown_schema_is_not_passed(tmp_path):
    meta = _load("vista2d")
    meta["schema"] = URL + "meta_schema_29991231.json"
    with pytest.raises(ValueError, match="not kept in ci/schemas"):
        _validate(tmp_path, meta)


def test_check_4_uses_the_schema_the_metadata_names(tmp_path):
    b = write_minimal_bundle(tmp_path)
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    meta["schema"] = URL + "meta_schema_20220324.json"  # 2022 rules: optional_packages_version required
    (b / "configs" / "metadata.json").write_text(json.dumps(meta))
    check = next(c for c in vb.verify_bundle(b, skip_network=True) if c.name == "4 verify_metadata")
    assert not check.ok and "optional_packages_version" in check.detail


def test_kept_schemas_are_valid_json_schemas_and_used():
    from jsonschema import validators

    used = {_load(n)["schema"].rsplit("/", 1)[1] for n in FIXTURE_NAMES}
    for f in sorted(vb.SCHEMA_DIR.glob("*.json")):
        schema = json.loads(f.read_text())
        validators.validator_for(schema).check_schema(schema)
        assert f.name in used, f"{f.name}: no fixture exercises it"
