"""Import-time stand-in for torchvision in the SGLang tests (CPU torch has no matching
torchvision wheel, and SGLang imports it at module level through its multimodal
configs, which the memory-cache layer under test never uses). Any submodule imports;
any name can be imported; using one raises."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class Unavailable:
    """A torchvision name: importable, unusable."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self._name} is a test stand-in: the real torchvision is not installed")

    __call__ = _refuse

    def __getattr__(self, attribute: str) -> Unavailable:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return Unavailable(f"{self._name}.{attribute}")

    def __mro_entries__(self, bases: tuple[object, ...]) -> tuple[type, ...]:
        return (object,)  # a base class of a class that is never instantiated here


def _module_getattr(module_name: str):
    def __getattr__(attribute: str) -> Unavailable:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return Unavailable(f"{module_name}.{attribute}")

    return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        return None


__version__ = "0.0.0+stand-in"
__getattr__ = _module_getattr(__name__)
sys.meta_path.append(_Finder())
