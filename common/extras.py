"""Optional packages (requirements-extra.txt): imported only by the feature that needs
them, with one sentence naming the package when it is missing or broken."""
import importlib
from types import ModuleType
from typing import Optional

from common.errors import UserError

# module -> what needs it
EXTRAS = {
    "tensorboard": "--tensorboard",
    "matplotlib": "plot_run.py and main_knn.py --plot-embeddings",
    "onnx": "export_backbone.py --format onnx",
    "onnxscript": "export_backbone.py --format onnx",
    "onnxruntime": "checking an ONNX export",
    "pyarrow": "main_knn.py --export-format parquet",
    "tifffile": "reading a multi-band TIFF",
}


def _missing(e: ImportError, module: str, package: str) -> bool:
    """Whether `e` says the package itself is absent, rather than that something it imports
    is (a missing or mismatched dependency: the package is there but broken)."""
    return isinstance(e, ModuleNotFoundError) and e.name is not None and (
        e.name == package or module == e.name or module.startswith(e.name + "."))


def require(module: str, package: Optional[str] = None) -> ModuleType:
    """Import an optional package, or stop with which package to install and why.

    `package`: the pip package `module` belongs to, when that is not its top-level name
    (torch.utils.tensorboard: tensorboard)."""
    package = package or module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if _missing(e, module, package):
            raise UserError(f"{EXTRAS.get(package, module)} needs the {package} package, which is not installed; "
                            f"pip install {package} (or pip install -r requirements-extra.txt)") from e
        error = e
    # importing runs the package's own code: a version clash with a dependency (protobuf's
    # TypeError under tensorboard, say) raises anything, not only ImportError
    except Exception as e:
        error = e
    detail = (str(error).strip().splitlines() or [""])[0][:200]  # protobuf's runs to a page
    raise UserError(f"{EXTRAS.get(package, module)} needs the {package} package, and the installed {package} fails "
                    f"to import ({type(error).__name__}{': ' + detail if detail else ''}); reinstall it or its "
                    f"dependencies (pip install -U {package})") from error


def available(module: str) -> bool:
    """Whether `module` imports: False when it is missing and when it is installed but broken."""
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False
