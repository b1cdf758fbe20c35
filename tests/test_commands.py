"""The command line assembled from each task's declarations: a task's flags alone under ``train TASK``, flags of another
task's checkpoints refused, ``--version``, and a parser built without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepscope import __version__
from deepscope.cli import build_parser, main
from deepscope.engine.checkpoint import save_checkpoint
from deepscope.tasks import TASKS

# flags that only some tasks' training takes
OWN_TRAIN_FLAGS = {
    "classify": {"--resize", "--loader"},
    "denoise": {"--method"},
    "detect": {"--images", "--annotations"},
    "segment": {"--labels"},
    "ssl": {"--method"},
}


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_help_lists_the_task_flags_alone(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(["train", task, "--help"], capsys)
    for flag in OWN_TRAIN_FLAGS[task] | {"--data", "--epochs", "--max-minutes", "--set", "--resume"}:
        assert f"{flag} " in text, flag
    for other, flags in OWN_TRAIN_FLAGS.items():
        for flag in flags - OWN_TRAIN_FLAGS[task]:
            assert f"{flag} " not in text, (other, flag)
    if task == "denoise":
        assert "{n2v,n2n,supervised}" in text and "simclr" not in text
    if task == "ssl":
        assert "{simclr,vicreg}" in text and "n2v" not in text


def test_a_flag_of_another_task_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "detect", "--data", "d", "--method", "n2v"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --method n2v" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert help_text(["--version"], capsys).strip() == f"deepscope {__version__}"


def test_building_the_parser_imports_neither_torch_nor_a_task() -> None:
    code = (
        "import sys\nfrom deepscope.cli import build_parser\nbuild_parser().parse_args(['train', 'detect', '--data', 'd'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'torchvision', 'scipy') "
        "or m.startswith(('deepscope.tasks.detect.task', 'deepscope.engine', 'deepscope.data.')))\n"
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture()
def header_only(tmp_path):
    """A checkpoint of each task holding nothing but its config: enough for a command to read which task it is."""

    def make(task: str):
        path = tmp_path / f"{task}.pt"
        save_checkpoint({"model": {}, "config": {"task": task}}, path)
        return str(path)

    return make


@pytest.mark.parametrize(
    ("task", "argv", "message"),
    [
        ("classify", ["predict", "{ckpt}", "x.png", "--out", "p.csv", "--instances"], "--instances applies to segment"),
        (
            "classify",
            ["predict", "{ckpt}", "x.png", "--out", "p.csv", "--tile", "64"],
            "--tile applies to denoise, detect and segment",
        ),
        (
            "detect",
            ["predict", "{ckpt}", "x.png", "--out", "p", "--halo", "8"],
            "--halo applies to denoise and segment",
        ),
        ("segment", ["predict", "{ckpt}", "x.png", "--out", "p", "--draw"], "--draw applies to detect"),
        ("segment", ["evaluate", "{ckpt}", "--data", "d", "--tta"], "--tta applies to denoise"),
        ("denoise", ["evaluate", "{ckpt}", "--data", "d", "--probe", "knn"], "--probe applies to ssl"),
        ("ssl", ["evaluate", "{ckpt}", "--data", "d", "--labels", "masks"], "--labels applies to segment"),
        ("ssl", ["predict", "{ckpt}", "x.png", "--out", "p"], "the ssl checkpoint has nothing to predict"),
        ("ssl", ["evaluate", "{ckpt}", "--data", "d"], "ssl checkpoints are evaluated with --probe"),
        ("segment", ["evaluate", "{ckpt}", "--data", "d", "--pred", "p"], "--pred and --truth score saved results"),
    ],
)
def test_flags_of_other_checkpoints_are_refused_in_one_line(task, argv, message, header_only, tmp_path, capsys):
    ckpt = header_only(task)
    assert main([a.replace("{ckpt}", ckpt) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_saved_results_take_their_own_task_flags(tmp_path, capsys):
    assert main(["evaluate", "segment", "--pred", "p", "--truth", "t", "--data-range", "255"]) == 2
    assert "--data-range applies to denoise only; these are saved segment results" in capsys.readouterr().err
    assert main(["evaluate", "denoise", "--pred", "p"]) == 2
    assert "needs --pred and --truth" in capsys.readouterr().err
