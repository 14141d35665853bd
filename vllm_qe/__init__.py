"""vllm-qe: quantized VLM serving on vLLM with token-aware low-rank error experts."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the `vllm.general_plugins` group (called in every vLLM process; idempotent)."""
    from vllm_qe.runtime.plugin import register as _register

    _register()


def _checkout_layout() -> None:
    """A plain checkout (nothing installed, the repository root on `sys.path`): map `vllm_qe.calibration` and
    `vllm_qe.kernels` to the sibling folders `calibration/` and `kernels/`, as pyproject's `package-dir` does for
    an installed package. Appended last to `sys.meta_path`: an install (wheel or editable) always wins."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folders = {f"{__name__}.{n}": root / n for n in ("calibration", "kernels")}
    if not all((f / "__init__.py").is_file() for f in folders.values()):
        return  # an installed package: the sub-packages live inside it

    class _CheckoutFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            folder = folders.get(fullname)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "_CheckoutFinder" for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder())


_checkout_layout()
