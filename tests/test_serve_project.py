"""The project file of `deepscope serve`: defaults, round trip, and one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepscope.errors import DataError, DeepscopeError
from deepscope.serve.folder import ServedFolder
from deepscope.serve.project import PROJECT_FILE, LabelClass, Project
from deepscope.tasks.pixel.features import FeatureSpec


def test_defaults_when_the_file_is_missing(tmp_path: Path) -> None:
    project = Project.load(ServedFolder(tmp_path))
    assert [(c.value, c.name) for c in project.classes] == [(1, "background"), (2, "foreground")]
    assert project.classes[0].colour != project.classes[1].colour
    assert project.features["gaussian"] == [0.3, 1.0, 1.6, 3.5] and project.features["hessian"] == [1.0, 1.6, 3.5]
    assert len(FeatureSpec.create(project.features).names()) == 4 + 3 * 3 + 3 * 2 * 2  # 2D: eigenvalue pairs
    assert project.normalize == [1.0, 99.8] and project.classifier is None
    assert not (tmp_path / PROJECT_FILE).exists()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    folder = ServedFolder(tmp_path)
    project = Project.load(folder)
    project.classes.append(LabelClass(7, "membrane", "#2ca02c"))
    project.features = {"gaussian": [1.0], "dog": [2.0, 4.0]}
    project.normalize, project.classifier = None, "pixel-classifier.safetensors"
    project.save(folder)
    project.record(folder, "labelled", "images/a.png")
    project.record(folder, "models", "models/run1/best.pt")
    project.record(folder, "labelled", "images/a.png")  # once only
    assert Project.load(folder) == project and project.labelled == ["images/a.png"]
    assert yaml.safe_load((tmp_path / PROJECT_FILE).read_text())["classes"][2] == {
        "value": 7,
        "name": "membrane",
        "colour": "#2ca02c",
    }
    assert [p.name for p in tmp_path.iterdir()] == [PROJECT_FILE]  # no temporary file left
    assert project.class_by_value(7).name == "membrane"
    with pytest.raises(DeepscopeError, match="label 3 is not a class"):
        project.class_by_value(3)


def test_a_partial_file_keeps_the_other_defaults(tmp_path: Path) -> None:
    (tmp_path / PROJECT_FILE).write_text("classes:\n- {value: 1, name: cell, colour: '#000000'}\n")
    project = Project.load(ServedFolder(tmp_path))
    assert project.classes == [LabelClass(1, "cell", "#000000")] and project.features == Project().features


@pytest.mark.parametrize(
    "text, message",
    [
        ("classes: [\n", "not a readable YAML file"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("colours: []\n", "unknown setting"),
        ("classes:\n- {value: 1, name: a}\n", "classes must be a list of"),
        (
            "classes:\n- {value: 1, name: a, colour: '#ff0000'}\n- {value: 1, name: b, colour: '#00ff00'}\n",
            "duplicate class values",
        ),
        ("classes:\n- {value: 1, name: a, colour: red}\n", "colour 'red' is not #rrggbb"),
        ("classes:\n- {value: 256, name: a, colour: '#ff0000'}\n", "class value 256"),
        ("classes: []\n", "at least one class"),
        ("features: {sobel: [1.0]}\n", "unknown filter 'sobel'"),
        ("features: {gaussian: [-1.0]}\n", "positive scales"),
        ("normalize: [99, 1]\n", "normalize"),
        ("classifier: /etc/passwd\n", "classifier must be a path inside the folder"),
        ("classifier: ../x.pkl\n", "classifier must be a path inside the folder"),
        ("labelled: [../a.png]\n", "labelled must be a list of paths inside the folder"),
        ("models: /tmp/best.pt\n", "models must be a list of paths inside the folder"),
    ],
)
def test_bad_project_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / PROJECT_FILE).write_text(text)
    with pytest.raises(DataError, match=message) as error:
        Project.load(ServedFolder(tmp_path))
    assert str(error.value).startswith(f"{tmp_path / PROJECT_FILE}: ")


def test_check_refuses_bad_values_from_the_page(tmp_path: Path) -> None:
    folder = ServedFolder(tmp_path)
    project = Project(classes=[LabelClass("1", "a", "#ff0000")])
    with pytest.raises(DataError, match="class value '1'"):
        project.check(folder)
    with pytest.raises(DataError, match="class value '1'"):
        project.save(folder)
    assert not (tmp_path / PROJECT_FILE).exists()
