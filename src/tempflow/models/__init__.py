"""Model registry: names of shipped models and loaders keyed by the class name in model_index.json.

``load_model`` takes a shipped name (``shapes-base``), a local folder or a Hugging Face hub id
(``stabilityai/stable-diffusion-3.5-medium``, ``black-forest-labs/FLUX.1-dev``). Folders and hub ids
go through the same ``from_pretrained(name_or_path)`` call; the class name in the folder's (or the
repository's) ``model_index.json`` picks the loader. A LoRA run's ``final/`` folder holds
``tempflow_adapter.json`` instead: its base model is loaded and the adapter fused into it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from tempflow.errors import ConfigError, ModelLoadError
from tempflow.models.base import Conditioning, FlowModel, ModelOptions, TrainableFlowModel, compile_flow
from tempflow.models.lora import ADAPTER_FILE, LORA_DIR

__all__ = ["Conditioning", "FlowModel", "ModelOptions", "TrainableFlowModel", "compile_flow", "load_model",
           "model_loaders", "resolve_model_path", "shipped_models"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _load_sd3(name_or_path: str, options: ModelOptions) -> FlowModel:
    from tempflow.models.sd3 import SD3FlowModel

    return SD3FlowModel.load(name_or_path, options)  # type: ignore[return-value]


def _load_flux(name_or_path: str, options: ModelOptions) -> FlowModel:
    from tempflow.models.flux import FluxFlowModel

    return FluxFlowModel.load(name_or_path, options)  # type: ignore[return-value]


LOADERS: dict[str, Callable[[str, ModelOptions], FlowModel]] = {
    "StableDiffusion3Pipeline": _load_sd3,
    "FluxPipeline": _load_flux,
}


def shipped_models() -> dict[str, Path]:
    """Models shipped by the worlds, by name (``shapes-base``) -> folder."""
    from tempflow.worlds import all_worlds

    return {name: path for world in all_worlds() for name, path in world.models().items()}


def model_loaders() -> dict[str, Callable[[str, ModelOptions], FlowModel]]:
    """Loaders by the class name in model_index.json: the diffusers adapters and the worlds' models."""
    from tempflow.worlds import all_worlds

    return {**{k: v for world in all_worlds() for k, v in world.model_loaders().items()}, **LOADERS}


def resolve_model_path(name_or_path: str) -> Path:
    """A shipped model's folder, or the user's folder; checks it looks like a model."""
    shipped = shipped_models()
    path = shipped.get(name_or_path, Path(name_or_path))
    if not path.is_dir():
        raise ModelLoadError(
            f"model {name_or_path!r} is neither a shipped model ({', '.join(shipped)}), a folder nor a hub id "
            "(owner/name); give a model folder such as RUN_DIR/final or runs/pretrain/model"
        )
    if not (path / "model_index.json").is_file() and not (path / ADAPTER_FILE).is_file():
        raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no model_index.json")
    return path


def _hub_index(repo_id: str) -> dict:
    """model_index.json of a hub repository (downloaded once into the Hugging Face cache)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hub_logging

        verbosity = hub_logging.get_verbosity()
        hub_logging.set_verbosity_error()  # its retry lines would bury the one line that says what to do
        try:
            return json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text(encoding="utf-8"))
        finally:
            hub_logging.set_verbosity(verbosity)
    except Exception as e:  # no network, unknown or gated repository, no huggingface_hub
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"model {repo_id!r} is not a local folder and its model_index.json could not be fetched from the "
            f"Hugging Face hub ({first}); check the id, log in for gated models (huggingface-cli login), or give "
            "a local folder") from None


def _read_index(path: Path) -> dict:
    name = ADAPTER_FILE if (path / ADAPTER_FILE).is_file() else "model_index.json"
    try:
        index = json.loads((path / name).read_text(encoding="utf-8"))
        index["_class_name"]
        return index
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelLoadError(f"{str(path / name)!r} is not a valid model index") from None


def _load_adapter(path: Path, index: dict, options: ModelOptions | None) -> FlowModel:
    """A LoRA run's final/: the base model (with the run's options unless given) and the adapter fused in."""
    base_options = options or ModelOptions(**index.get("options", {}))
    model = load_model(str(index["base"]), base_options)
    model.load_lora(path / LORA_DIR)  # type: ignore[attr-defined]
    return model


def load_model(name_or_path: str, options: ModelOptions | None = None, device: str | None = None) -> FlowModel:
    """Load a model by shipped name, folder or hub id; any failure is one clear ModelLoadError.

    options: device, dtype, resolution, ... (defaults: ModelOptions()); `device` overrides options.device.
    With options.compile the flow transformer is compiled in place (`compile_flow`).
    """
    if device is not None:
        options = ModelOptions(**{**vars(options or ModelOptions()), "device": device})
    local = name_or_path in shipped_models() or Path(name_or_path).exists() or not _HUB_ID.fullmatch(name_or_path)
    if local:
        path = resolve_model_path(name_or_path)
        index, source = _read_index(path), str(path)
    else:
        index, source = _hub_index(name_or_path), name_or_path
    cls, loaders = index["_class_name"], model_loaders()
    if cls not in loaders:
        raise ModelLoadError(f"model class {cls!r} in {source!r} is unknown; known: {', '.join(loaders)}")
    try:
        if local and (path / ADAPTER_FILE).is_file():
            return _load_adapter(path, index, options)
        model = loaders[cls](source, options or ModelOptions())
    except (ModelLoadError, ConfigError):
        raise
    except Exception as e:  # a corrupt or incomplete folder: say which, never a traceback
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"cannot load model from {source!r} (corrupt or incomplete?): {first}") from None
    check = getattr(model, "check_finite", None)
    if check is not None:  # a run that diverged must not hand on its weights
        check(f"cannot use the model in {source!r}")
    if options is not None and options.compile:
        compile_flow(model)  # type: ignore[arg-type]
    return model
