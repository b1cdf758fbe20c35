"""Fuzzed settings: YAML config files and ``--set`` values of every ``train`` task and of ``pixel train``.

Each example starts from a task's default settings, which load, edits a few values into junk (wrong types, NaN, huge
numbers, nested lists, unknown keys) and writes them as YAML; or writes hostile YAML instead: documents that are not
a mapping, alias bombs, Python tags, deep nesting, random bytes. The functions the CLI resolves settings with must
return a config whose every value has its declared type and can be saved, or raise a one-line DeepscopeError naming
the file or the setting (see ``refused_or_read`` in test_fuzz_readers).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from deepscope.cli import build_parser, resolve_train_config
from deepscope.config import _resolve_type, to_dict
from deepscope.errors import DeepscopeError
from deepscope.tasks import TASKS, get_task
from deepscope.tasks.pixel.commands import resolve_pixel_config
from deepscope.tasks.pixel.config import PixelConfig
from test_fuzz_readers import BOMB, FUZZ, JUNK, NASTY_TEXT, edit_json, mutate, refused_or_read, scratch

CONFIGS = {**{task: get_task(task)[0] for task in sorted(TASKS)}, "pixel": PixelConfig}
PARSER = build_parser()
HOSTILE_YAML = [
    "- a\n- b\n",
    "42\n",
    "just text\n",
    "...\n",
    "data: *undefined\n",
    "data: [1\n",
    "data: !!binary aGk=\n",
    "data: !!python/object/apply:os.mkdir [pwned]\n",
    "data: !!python/name:os.system\n",
    "epochs: !!float nan\n",
    f"model_args: {BOMB}\n",
    f"model_args: {BOMB}\ndata: *i\n",
    f"model_args: {BOMB}\nepochs: *i\n",
    "model_args: &a {x: *a}\n",
    "model_args: " + "[" * 3000 + "]" * 3000 + "\n",
    "data: \x00\n",
    "\tdata: x\n",
    "data: a\ndata: b\n",
]
YAML_VALUES = [
    "",
    "null",
    "[1",
    "{a: 1",
    "'",
    "*undefined",
    "&a [*a]",
    "!!python/object/apply:os.mkdir [pwned]",
    "1e400",
    ".nan",
    "-.inf",
    "0x10",
    "2001-12-14",
    "!!set {a, b}",
    "[" * 3000,
    "{x: [1, {y: 2}]}",
    "yes",
]


def setting_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every setting of config class ``cls``, nested groups included."""
    keys = []
    for field in dataclasses.fields(cls):
        tp = _resolve_type(typing.get_type_hints(cls)[field.name])
        keys.append(prefix + field.name)
        if dataclasses.is_dataclass(tp):
            keys += setting_keys(tp, f"{prefix}{field.name}.")
    return keys


def leaf_names(task: str) -> list[str]:
    """The names an error about one of the task's settings may give (checks after loading name the setting only)."""
    return [key.rsplit(".", 1)[-1] for key in setting_keys(CONFIGS[task])]


def names_in(text: str | bytes) -> list[str]:
    """The keys (of two characters or more) of every mapping in a YAML document that parses: a check after loading
    may name the entry it refuses, as pixel's features do (``unknown filter 'id'``), rather than the setting.
    Each shared list or mapping is visited once, so an alias bomb costs no more than its text."""
    try:
        stack, seen, found = [yaml.safe_load(text)], set(), []
    except (yaml.YAMLError, RecursionError):
        return []
    while stack:
        node = stack.pop()
        if isinstance(node, (list, dict)) and id(node) not in seen:
            seen.add(id(node))
            found += [key for key in node if isinstance(key, str) and len(key) > 1] if isinstance(node, dict) else []
            stack += node.values() if isinstance(node, dict) else node
    return found


def defaults(task: str) -> dict[str, Any]:
    """The task's default settings with a data path: a file of them loads."""
    values = to_dict(CONFIGS[task]())
    values["images" if task == "pixel" else "data"] = "data"
    return values


def assert_typed(config: Any) -> None:
    """Every value has its declared type (None where it was given as null), and the config can be saved as YAML."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, tp = getattr(config, field.name), _resolve_type(hints[field.name])
        origin = typing.get_origin(tp)
        if value is None or tp is Any:
            continue
        if dataclasses.is_dataclass(tp):
            assert_typed(value)
        elif origin is not None:
            assert isinstance(value, origin if origin is not list else (list, tuple)), (field.name, value)
        else:
            assert isinstance(value, tp) and (tp is bool or not isinstance(value, bool)), (field.name, value)
    yaml.safe_dump(to_dict(config))  # what training writes as config.yaml


def resolve(task: str, config: Path | None, assignments: list[str]) -> Any:
    """The settings ``train TASK`` (or ``pixel train``) would run with; ``--set=`` so a value may start with a dash."""
    argv = ["pixel", "train"] if task == "pixel" else ["train", task]
    argv += (["--config", str(config)] if config else []) + [f"--set={a}" for a in assignments]
    args = PARSER.parse_args(argv)
    config = (resolve_pixel_config if task == "pixel" else resolve_train_config)(args)
    assert_typed(config)
    return config


@st.composite
def config_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """A task and the bytes of its config file: default settings with junk edits, hostile YAML, or random bytes."""
    task = draw(st.sampled_from(sorted(CONFIGS)))
    kind = draw(st.sampled_from(["edited"] * 4 + ["hostile", "bytes"]))
    if kind == "hostile":
        return task, draw(st.sampled_from(HOSTILE_YAML)).encode()
    values = defaults(task)
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            values = edit_json(values, draw)
        elif isinstance(values, dict):
            values[draw(st.sampled_from([*setting_keys(CONFIGS[task]), *NASTY_TEXT[:3]]))] = draw(JUNK)
    text = yaml.safe_dump(values, allow_unicode=True).encode()
    return task, mutate(text, draw) if kind == "bytes" else text


@FUZZ
@given(config_file())
def test_config_files_with_junk_and_hostile_yaml(made: tuple[str, bytes]) -> None:
    task, content = made
    with scratch() as folder:
        path = folder / "config.yaml"
        path.write_bytes(content)
        refused_or_read(lambda: resolve(task, path, []), folder, str(path), *leaf_names(task), *names_in(content))


@st.composite
def assignments(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A task and ``--set`` assignments: known or junk keys, valid, junk or malformed YAML values, or no ``=``."""
    task = draw(st.sampled_from(sorted(CONFIGS)))
    keys = st.one_of(
        st.sampled_from(setting_keys(CONFIGS[task])),
        st.sampled_from(["", ".", "a..b", "optim.lr.x", "名前", "x" * 300]),
    )
    values = st.one_of(
        st.sampled_from(YAML_VALUES), JUNK.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
    )
    made = draw(
        st.lists(st.one_of(st.tuples(keys, values).map("=".join), st.sampled_from(NASTY_TEXT)), min_size=1, max_size=3)
    )
    return task, made


@FUZZ
@given(assignments())
def test_set_values_with_junk(made: tuple[str, list[str]]) -> None:
    task, sets = made
    with scratch() as folder:
        data = "images=data" if task == "pixel" else "data=data"
        named = [
            "--set",
            "command line",
            "setting",
            *leaf_names(task),
            *(n for a in sets for n in names_in(a.partition("=")[2])),
        ]
        refused_or_read(lambda: resolve(task, None, [data, *sets]), folder, *named)


@pytest.mark.parametrize("where", ["file", "--set"])
def test_python_tags_are_refused_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """safe_load refuses the tags yaml.load would run: the directory the payload makes is never made."""
    monkeypatch.chdir(tmp_path)
    payload = "!!python/object/apply:os.mkdir [pwned]"
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {payload}\n")
    with pytest.raises(DeepscopeError, match="python/object/apply:os.mkdir"):
        resolve("classify", config, []) if where == "file" else resolve("classify", None, [f"data={payload}"])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "text",
    [
        f"model_args: {BOMB}",
        f"model_args: {BOMB}\ndata: *i",
        f"model_args: {BOMB}\nepochs: *i",
        "model_args: &a {x: *a}",
    ],
    ids=["in-a-mapping", "as-text", "as-a-number", "holding-itself"],
)
def test_yaml_alias_bombs_are_refused_without_expanding(tmp_path: Path, text: str) -> None:
    """Nine shared lists hold 9**9 items once expanded, by str() of a value, a message quoting it, or the copy of the
    settings that training saves; a list that holds itself never ends. Each is refused while it is still shared."""
    config = tmp_path / "config.yaml"
    config.write_text(f"data: somewhere\n{text}\n")  # a later data: wins
    with pytest.raises(DeepscopeError, match=rf"^{config}: "):
        resolve("classify", config, [])
