"""Label schema: defaults, schema files for other procedures, strict lookups."""

from __future__ import annotations

import json

import pytest

from surgenet_assist.core.errors import SchemaError
from surgenet_assist.core.schema import DEFAULT_SCHEMA, IGNORE_INDEX, LabelSchema


def test_defaults_match_the_datasets():
    s = DEFAULT_SCHEMA
    assert s.num_classes == 13 and s.num_phases == 7 and s.cvs_keys == ["C1", "C2", "C3"]
    assert (
        s.classes[5].name == "Grasper"
        and s.classes[5].color == (170, 255, 0)
        and s.classes[5].watershed == 31
    )
    assert s.phase_id("calot triangle dissection") == 1 == s.phase_id("CalotTriangleDissection")
    assert s.class_id("l-hook electrocautery") == 9
    assert s.palette()[IGNORE_INDEX].tolist() == [0, 0, 0] and s.palette()[2].tolist() == [255, 114, 114]


def test_unknown_labels_are_errors_with_the_known_ones():
    with pytest.raises(SchemaError, match="unknown phase 'Suturing'") as err:
        DEFAULT_SCHEMA.phase_id("Suturing")
    assert "Preparation" in str(err.value)
    with pytest.raises(SchemaError, match="unknown class"):
        DEFAULT_SCHEMA.class_id("Spleen")


def test_membership_questions_match_the_strict_lookups():
    s = DEFAULT_SCHEMA
    assert s.has_cvs("C2") and s.has_cvs("c 2") and s.has_cvs("Cystic plate")
    assert s.cvs_id("cystic plate") == 2
    assert not s.has_cvs("C4") and not s.has_cvs("Preparation") and not s.has_cvs("")
    assert s.has_phase("Clipping and Cutting") and not s.has_phase("C1")
    assert s.has_class("gallbladder") and not s.has_class("C1")
    custom = LabelSchema.from_dict({"name": "x", "cvs": [{"key": "A", "name": "Anatomy seen"}]})
    assert custom.has_cvs("anatomy seen") and not custom.has_cvs("C1")


def test_yaml_schema_file_round_trip(tmp_path):
    path = tmp_path / "autolaparo.yaml"
    path.write_text(
        "name: hysterectomy\n"
        "classes:\n  - {name: Background, color: [0, 0, 0]}\n  - {name: Uterus}\n  - {name: Instrument}\n"
        "phases: [Preparation, Dividing Ligament and Peritoneum, Suturing]\n"
    )
    schema = LabelSchema.from_file(path)
    assert schema.name == "hysterectomy" and schema.num_classes == 3 and schema.num_phases == 3
    assert schema.phase_id("suturing") == 2 and schema.cvs_keys == ["C1", "C2", "C3"]
    out = tmp_path / "copy.json"
    schema.to_file(out)
    assert LabelSchema.from_file(out) == schema
    assert json.loads(out.read_text())["classes"][1]["name"] == "Uterus"


@pytest.mark.parametrize(
    "text, match",
    [
        ("classes: [{colour: red}]", "malformed"),
        ("classes:\n  - {id: 1, name: A}\n", "ids must be"),
        ("[unclosed", "not valid"),
        ("just a string", "mapping"),
    ],
)
def test_malformed_schema_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SchemaError, match=match):
        LabelSchema.from_file(path)
    with pytest.raises(SchemaError, match="cannot read"):
        LabelSchema.from_file(tmp_path / "missing.yaml")
