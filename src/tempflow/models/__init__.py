"""Model registry: names of shipped models and loaders keyed by the class name in model_index.json."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from tempflow.errors import ModelLoadError
from tempflow.models.base import Conditioning, FlowModel

__all__ = ["Conditioning", "FlowModel", "load_model", "resolve_model_path", "SHIPPED"]

# name -> (package, folder) of models shipped inside the package
SHIPPED: dict[str, tuple[str, str]] = {"shapes-base": ("tempflow.shapes", "base")}


def _load_shapes(path: Path) -> FlowModel:
    from tempflow.shapes.model import ShapesFlowModel

    return ShapesFlowModel.load(path)


LOADERS: dict[str, Callable[[Path], FlowModel]] = {"ShapesFlowModel": _load_shapes}


def resolve_model_path(name_or_path: str) -> Path:
    """A shipped model's folder, or the user's folder; checks it looks like a model."""
    if name_or_path in SHIPPED:
        package, folder = SHIPPED[name_or_path]
        path = Path(str(resources.files(package) / folder))
    else:
        path = Path(name_or_path)
    if not path.is_dir():
        raise ModelLoadError(
            f"model {name_or_path!r} is neither a shipped model ({', '.join(SHIPPED)}) nor a folder; "
            "give a model folder such as RUN_DIR/final or runs/pretrain/model"
        )
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no model_index.json")
    return path


def load_model(name_or_path: str, device: str = "cpu") -> FlowModel:
    """Load a model by shipped name or folder; any failure is one clear ModelLoadError."""
    import json

    path = resolve_model_path(name_or_path)
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        cls = index["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelLoadError(f"{str(path / 'model_index.json')!r} is not a valid model index") from None
    if cls not in LOADERS:
        raise ModelLoadError(f"model class {cls!r} in {str(path)!r} is unknown; known: {', '.join(LOADERS)}")
    try:
        model = LOADERS[cls](path)
    except Exception as e:  # a corrupt or incomplete folder: say which, never a traceback
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"cannot load model from {str(path)!r} (corrupt or incomplete?): {first}") from None
    return model.to(device)  # type: ignore[attr-defined]
