"""Checkpoints written atomically, loaded without running anything, and the RNG state they carry.

A checkpoint is a safetensors file (:mod:`deepscope.safefile`): tensors plus a JSON header, so opening one from
someone else's folder cannot execute code, and its task can be read from the header alone. It is first written to a
temporary file in the same folder and then renamed over the old one, so a run killed (or a disk filling up) while
saving leaves the previous checkpoint intact.

Checkpoints of earlier versions, and weight files of other tools (``.pt``/``.pth`` state dicts), are PyTorch pickles.
They are opened with ``torch.load(weights_only=True)``, whose unpickler builds only tensors, plain values and the few
numpy types an RNG state holds; a pickle asking for anything else (a class, a function) is refused with one line.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import shutil
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml

from deepscope.atomic import atomic_write
from deepscope.errors import CheckpointError
from deepscope.safefile import FORMAT_KEY, decode_state, is_safetensors, read_metadata, read_safetensors, write_state

FORMAT = "deepscope-checkpoint"
# numpy's array-rebuilding function, in whichever module this numpy keeps it (an array's reduce value is a tuple)
_REBUILD_ARRAY = cast(Callable[..., Any], np.zeros(0).__reduce__()[0])
# What ``np.random.get_state()`` pickles to: checkpoints of earlier versions hold one (written by numpy 1 or 2)
NUMPY_GLOBALS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    _REBUILD_ARRAY,
    (_REBUILD_ARRAY, "numpy.core.multiarray._reconstruct"),
    (_REBUILD_ARRAY, "numpy._core.multiarray._reconstruct"),
]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically; the header names the task, for listings that open nothing."""
    task = state.get("config", {}).get("task")
    write_state(Path(path), state, FORMAT, "checkpoint", {"task": str(task)} if task else None)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Atomically copy a finished checkpoint (e.g. best.pt to last.pt) without re-serialising."""
    with open(src, "rb") as source:
        atomic_write(Path(dst), lambda handle: shutil.copyfileobj(source, handle, 1 << 20), "checkpoint")


def _unpickle_weights_only(path: Path, data: bytes | None = None) -> Any:
    """A PyTorch pickle, built by ``torch.load``'s restricted unpickler: tensors and plain values only; ``data``: its
    bytes, read from inside ``path``."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS), warnings.catch_warnings():
            # torch's note on an old pickle protocol says nothing to the user
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's restricted unpickler did not refuse: the file is damaged
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{path}: not a readable checkpoint (a damaged PyTorch file)") from None
        asked = re.search(r"GLOBAL (\S+)", str(exc)) or re.search(r"Unsupported (?:global|class)[: ]+(\S+)", str(exc))
        what = f"asks for {asked.group(1).rstrip('.,')}" if asked else "holds more than tensors and plain values"
        raise CheckpointError(
            f"{path}: refused: the file is a pickle that {what}, which could run code when opened; "
            "deepscope opens checkpoints and weight files of tensors and plain values only"
        ) from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None


def _check_pytorch_file(path: Path) -> None:
    """ValueError unless the file starts as ``torch.save`` writes: a zip archive, or (before PyTorch 1.6) a pickle."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ValueError("neither a safetensors file nor a PyTorch file")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A damaged file (ValueError) or one that cannot be read (OSError) as one CheckpointError line naming it."""
    try:
        yield
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


PACKAGE_FILES = ("rdf.yaml", "bioimageio.yaml")  # the model description inside a bioimage.io package


def package_description(path: Path) -> dict[str, Any]:
    """The model description (rdf.yaml) of a bioimage.io package, a .zip or the YAML file of an unpacked one, read with
    ``yaml.safe_load``."""
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if Path(n).name in PACKAGE_FILES)
            text = archive.read(name)
    else:
        text = path.read_bytes()
    try:
        rdf = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: its model description is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise CheckpointError(f"{path}: not the description of a bioimage.io model (type: model)")
    return rdf


def package_member(path: Path, source: str) -> bytes:
    """A file of a package by its name in the description: a member of the .zip, or a file beside the YAML (never
    outside its folder)."""
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as archive:
            try:
                return archive.read(source)
            except KeyError:
                raise CheckpointError(f"{path}: the package lacks {source}, which its description names") from None
    folder = path.resolve().parent
    member = (folder / source).resolve()
    if not member.is_relative_to(folder) or not member.is_file():
        raise CheckpointError(f"{path}: {source} is not a file of the package's folder")
    return member.read_bytes()


def package_weights(path: Path) -> bytes | None:
    """The ``pytorch_state_dict`` weights file of a bioimage.io package (a .zip with rdf.yaml), read in place; None
    for any other file. Only the weights are read: the package's architecture source is never run."""
    if path.suffix.lower() != ".zip" or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        if not any(Path(n).name in PACKAGE_FILES for n in archive.namelist()):
            return None
    weights = package_description(path).get("weights")
    entry = weights.get("pytorch_state_dict") if isinstance(weights, dict) else None
    source = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(source, str):
        raise CheckpointError(f"{path}: the bioimage.io package has no pytorch_state_dict weights to start from")
    return package_member(path, source)


def read_weights_file(path: Path) -> Any:
    """What a checkpoint or weights file holds, opened safely: a deepscope checkpoint's state, a safetensors file's
    tensors, a PyTorch pickle of tensors and plain values (see the module docstring), or the state dict of a
    bioimage.io package."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with _reading(path):
        packaged = package_weights(path)
        if packaged is not None:
            return _unpickle_weights_only(path, packaged)
        if not is_safetensors(path):
            _check_pytorch_file(path)
            return _unpickle_weights_only(path)
        metadata, tensors = read_safetensors(path)
        return decode_state(metadata, tensors, FORMAT) if metadata.get(FORMAT_KEY) == FORMAT else tensors


def load_checkpoint(path: str | Path, task: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Load a deepscope checkpoint onto the CPU, checking it belongs to ``task`` and ``model``."""
    path = Path(path)
    state = read_weights_file(path)
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: not a deepscope checkpoint (no model weights and config)")
    if task is not None and state["config"].get("task") != task:
        raise CheckpointError(f"{path}: checkpoint is for task {state['config'].get('task')!r}, not {task!r}")
    if model is not None and state["config"].get("model") != model:
        raise CheckpointError(f"{path}: checkpoint holds model {state['config'].get('model')!r}, not {model!r}")
    return state


def header_task(path: str | Path) -> str | None:
    """The task a checkpoint was trained for, from its header alone (nothing is unpickled, no tensor is read); None
    for a checkpoint of an earlier version, a pickle, whose task is known only once it is opened."""
    path = Path(path)
    with _reading(path):
        if not is_safetensors(path):
            _check_pytorch_file(path)
            return None
        metadata = read_metadata(path)
    if metadata.get(FORMAT_KEY) != FORMAT or not metadata.get("task"):
        raise CheckpointError(f"{path}: not a deepscope checkpoint (no header naming its task)")
    return metadata["task"]


def checkpoint_task(path: str | Path) -> str:
    """The task a checkpoint was trained for: from its header, or (an earlier version's pickle) by opening it safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    task = header_task(path)
    if task is not None:
        return task
    state = read_weights_file(path)
    try:
        return str(state["config"]["task"])
    except (TypeError, KeyError):
        raise CheckpointError(f"{path}: not a deepscope checkpoint (no config naming its task)") from None


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a state dict, turning torch's long mismatch report into one line."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: weights do not fit the model ({first})") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextmanager
def random_state_kept() -> Iterator[None]:
    """Run the block and put the random state back as it was: planning builds and times models, and a planned run
    must start from the same weights and batches as one given the planned values."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


SOURCE_PREFIXES = ("", "module.", "backbone.", "backbone.body.", "body.", "encoder.", "model.")
TARGET_PREFIXES = ("", "backbone.body.", "backbone.", "body.", "encoder.")


def _state_dict_of(value: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a deepscope checkpoint, a plain state dict, or a dict holding one under ``state_dict``/``model``."""
    if isinstance(value, dict):
        for key in ("model", "state_dict"):
            if isinstance(value.get(key), dict):
                value = value[key]
                break
    tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)} if isinstance(value, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path}: holds no weights (expected a deepscope checkpoint or a state dict of tensors)")
    return tensors


def load_init_weights(model: torch.nn.Module, path: str | Path, freeze: bool = False) -> str:
    """Start ``model`` (or its backbone) from the weights of a local file; returns one line saying what was taken.

    The file's keys are mapped onto the model's by the pair of key prefixes (e.g. a torchvision ResNet's ``layer1.*``
    onto a detector's ``backbone.body.layer1.*``) that fits the most tensors. Tensors whose shapes differ, and batch-norm
    statistics meeting a model without them (a GroupNorm model), are errors listing the keys: a partly fitting file is
    never loaded silently wrong. Keys with no counterpart at all (a classifier's last layer) are left out and named.
    ``freeze`` keeps every tensor taken from the file fixed (see :func:`freeze_tensors`).
    """
    path = Path(path)
    source = _state_dict_of(read_weights_file(path), path)
    target = model.state_dict()
    best: tuple[int, str, str] = (0, "", "")
    for strip in SOURCE_PREFIXES:
        keys = [k[len(strip) :] for k in source if k.startswith(strip)]
        for add in TARGET_PREFIXES:
            hits = sum(add + k in target for k in keys)
            best = max(best, (hits, strip, add))
    hits, strip, add = best
    if not hits:
        raise CheckpointError(
            f"{path}: no weight name fits the model (file keys like {next(iter(source))!r}, model keys like {next(iter(target))!r})"
        )
    mapped = {add + k[len(strip) :]: v for k, v in source.items() if k.startswith(strip)}
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and v.shape != target[k].shape
    ]
    stats = [
        k
        for k in mapped
        if k not in target
        and k.rsplit(".", 1)[-1] in ("running_mean", "running_var")
        and k.rsplit(".", 1)[0] + ".weight" in target
    ]
    if wrong_shape or stats:
        problems = [f"{len(wrong_shape)} of different shape ({', '.join(wrong_shape[:4])})"] if wrong_shape else []
        if stats:
            problems.append(
                f"batch-norm statistics for {len(stats)} layers the model normalises otherwise (e.g. {stats[0]}; "
                "build the model with the same norm, e.g. model_args.norm=batch)"
            )
        raise CheckpointError(f"{path}: weights do not fit the model: {'; '.join(problems)}")
    taken = {k: v for k, v in mapped.items() if k in target}
    left_out = [k for k in mapped if k not in target]
    model.load_state_dict(taken, strict=False)
    where = f"mapping {strip or '(top level)'}* onto {add or '(top level)'}*" if strip != add else "by name"
    left_out += [k for k in source if not k.startswith(strip)]  # e.g. a self-supervised run's projection head
    skipped = (
        f"; left out {len(left_out)} with no counterpart ({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''})"
        if left_out
        else ""
    )
    frozen = f"; {freeze_tensors(model, set(taken), path)} frozen" if freeze else ""
    return f"initialised {len(taken)} of {len(target)} tensors from {path} {where}{skipped}{frozen}"


def freeze_tensors(model: torch.nn.Module, names: set[str], path: Path) -> int:
    """Stop training the parameters in ``names``; returns how many. Batch-norm layers whose parameters are all frozen also
    keep their running statistics (they stay in eval mode whatever ``model.train()`` says), so a frozen encoder computes
    the same features in training as in evaluation, as a linear probe requires."""
    params = dict(model.named_parameters())
    for name in names & set(params):
        params[name].requires_grad_(False)
    if not any(p.requires_grad for p in params.values()):
        raise CheckpointError(
            f"{path}: it provides every weight of the model, so --freeze-encoder would leave nothing to train"
        )
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and own and not any(p.requires_grad for p in own):
            # this one module's train() replaced: mypy refuses assigning to a method, which is the point here
            module.train = types.MethodType(  # type: ignore[method-assign]
                lambda self, mode=True: torch.nn.Module.train(self, False), module
            )
            module.eval()
    return sum(1 for name in names if name in params)
