"""Optional packages (requirements-extra.txt): imported only by the feature that needs
them, with one sentence naming the package when it is missing."""
import importlib
from types import ModuleType

from common.errors import UserError

# module -> what needs it
EXTRAS = {
    "tensorboard": "--tensorboard",
    "matplotlib": "plot_run.py and main_knn.py --plot-embeddings",
    "onnx": "export_backbone.py --format onnx",
    "onnxscript": "export_backbone.py --format onnx",
    "onnxruntime": "checking an ONNX export",
}


def require(module: str) -> ModuleType:
    """Import an optional package, or stop with which package to install and why."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UserError(f"{EXTRAS.get(top, module)} needs the {top} package, which is not installed; "
                        f"pip install {top} (or pip install -r requirements-extra.txt)")


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
