"""open_clip without the seconds of torchvision and timm it does not use: their package ``__init__`` waits for use.

Why: ``import open_clip`` imports torchvision, whose ``__init__`` imports its detection models and with them
``torch._dynamo`` (about 1 s on a 2-core CPU), and timm, whose ``__init__`` registers every timm model (about
0.4 s), although a CLIP with open_clip's own ViT uses neither. What open_clip's modules take from them when it is
imported are leaves: ``torchvision.ops.misc.FrozenBatchNorm2d``, ``torchvision.transforms`` and ``timm.layers``.

:func:`defer_while_importing` (called once by ``pacl_fast/__init__.py``) arranges that while ``open_clip`` is
first imported, the packages :data:`OPEN_CLIP_DEFERRED` names (``torchvision``, ``torchvision.ops``, ``timm``)
are put in ``sys.modules`` without running their ``__init__``: such a module holds what the import system sets
(``__name__``, ``__spec__``, ``__path__``, ``__file__``...) and the submodules imported below it. The submodules
themselves load as usual. The first read of any other attribute (``torchvision.__version__``,
``timm.create_model``, ``dir()``, ``vars()``) runs the package's own ``__init__`` into that same module object,
the waiting packages above it first (as a plain import runs them) and those below it after, and the module's
class becomes ``types.ModuleType`` again: from then on it is the module a plain import makes. Nothing is deferred
outside the import of open_clip, and a package already imported is left alone.

What differs from a plain import, by construction: a deferred ``__init__`` runs at first use instead of at the
``import`` (an error in it is raised there), and the submodules open_clip imports ran before it; while open_clip
is being imported, ``from package import submodule`` inside a deferred package imports that submodule without
running the package's ``__init__``. Where this would break is a future version whose submodules read, while
being imported, something their deferred package's ``__init__`` defines; tests/test_deferred_imports.py checks the
installed versions: open_clip imports without them, a timm tower and torchvision's ops still work, and the
packages then hold everything a plain import gives.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: The packages whose ``__init__`` waits while open_clip is imported (see the module docstring).
OPEN_CLIP_DEFERRED = ("torchvision", "torchvision.models", "torchvision.ops", "timm")

#: Held while a deferred package loads or the deferral starts or ends: an ``__init__`` runs once.
_LOCK = threading.RLock()
#: The package names being deferred now, each with the number of :func:`deferring` blocks naming it.
_ACTIVE: dict[str, int] = {}


class _WaitingLoader(importlib.abc.Loader):
    """A deferred package's loader until its first use: it makes the module and runs nothing; ``real`` runs it."""

    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if type(module) is types.ModuleType:
            module.__class__ = DeferredPackage
        else:  # the real loader's own module type: not ours to change, so no waiting
            self.restore(module)
            self.real.exec_module(module)

    def restore(self, module: types.ModuleType) -> None:
        module.__spec__.loader = self.real
        module.__loader__ = self.real


class DeferredPackage(types.ModuleType):
    """A package whose ``__init__`` has not run: reading an attribute it does not hold yet runs it (:func:`load`)."""

    def __getattribute__(self, name: str) -> Any:
        if name == "__class__":
            return object.__getattribute__(self, name)
        held = object.__getattribute__(self, "__dict__")
        if name in held and name != "__loader__":  # what the import system set, and the submodules below
            return held[name]
        if _ACTIVE and not name.startswith("__"):
            submodule = _submodule(held, name)
            if submodule is not None:  # ``from . import sub`` inside the package, while open_clip is imported
                return submodule
        load(self)
        return getattr(self, name)


def _submodule(held: dict[str, Any], name: str) -> types.ModuleType | None:
    """The package's submodule ``name`` imported (None when it has none of that name)."""
    full = f"{held['__name__']}.{name}"
    if full not in sys.modules:
        try:
            if importlib.util.find_spec(full) is None:
                return None
        except (ImportError, ValueError):  # not importable as a module: an attribute the package's __init__ defines
            return None
    return importlib.import_module(full)


def waiting(module: types.ModuleType) -> bool:
    """Whether ``module`` is a deferred package whose ``__init__`` has not run yet."""
    return type(module) is DeferredPackage


def load(module: types.ModuleType) -> None:
    """Run a deferred package's ``__init__`` now, after those of the waiting packages above it (nothing when
    it has run)."""
    with _LOCK:
        if not waiting(module):
            return
        held = object.__getattribute__(module, "__dict__")
        name = held["__name__"]
        parent = sys.modules.get(name.rpartition(".")[0]) if "." in name else None
        if parent is not None and waiting(parent):
            load(parent)  # its __init__ may import (and so load) this one
            if not waiting(module):
                return
        spec = held["__spec__"]
        waiting_loader = spec.loader
        module.__class__ = types.ModuleType
        waiting_loader.restore(module)
        logger.debug("running the deferred __init__ of %s", name)
        spec._initializing = True
        try:
            waiting_loader.real.exec_module(module)
        finally:
            spec._initializing = False
        # The packages below that wait: a plain import ran their __init__ when something below them was imported
        for below in sorted(other for other in sys.modules if other.startswith(name + ".")):
            if below in sys.modules and waiting(sys.modules[below]):
                load(sys.modules[below])


class _Finder(importlib.abc.MetaPathFinder):
    """On ``sys.meta_path`` while something is deferred: a deferred package gets a :class:`_WaitingLoader` around
    the loader the other finders give it; everything else is theirs."""

    def __init__(self) -> None:
        self.asking = threading.local()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _ACTIVE or getattr(self.asking, "now", False):
            return None
        self.asking.now = True
        try:
            spec = _spec_from_others(self, fullname, path, target)
        finally:
            self.asking.now = False
        if spec is None or spec.submodule_search_locations is None or not hasattr(spec.loader, "exec_module"):
            return None  # not installed (the import fails as usual), or not a package: a plain import
        spec.loader = _WaitingLoader(spec.loader)
        return spec


def _spec_from_others(
    me: importlib.abc.MetaPathFinder, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    """The spec the finders on ``sys.meta_path`` other than ``me`` give: the one a plain import would use."""
    for finder in list(sys.meta_path):
        if finder is not me and hasattr(finder, "find_spec"):
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
    return None


_FINDER = _Finder()


@contextlib.contextmanager
def deferring(packages: Sequence[str]) -> Iterator[None]:
    """While the block runs, a package of ``packages`` (full dotted names) imported for the first time waits for
    its first use to run its ``__init__`` (see the module docstring)."""
    with _LOCK:
        names = [name for name in packages if name not in sys.modules]
        for name in names:
            _ACTIVE[name] = _ACTIVE.get(name, 0) + 1
        if names and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    try:
        yield
    finally:
        with _LOCK:
            for name in names:
                _ACTIVE[name] -= 1
                if not _ACTIVE[name]:
                    del _ACTIVE[name]
            if not _ACTIVE and _FINDER in sys.meta_path:
                sys.meta_path.remove(_FINDER)


class _ImportingLoader(importlib.abc.Loader):
    """``module``'s own loader, run inside :func:`deferring` (see :func:`defer_while_importing`)."""

    def __init__(self, real: importlib.abc.Loader, packages: Sequence[str]):
        self.real = real
        self.packages = tuple(packages)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__.loader = self.real
        module.__loader__ = self.real
        with deferring(self.packages):
            self.real.exec_module(module)


class _OnceFinder(importlib.abc.MetaPathFinder):
    """Waits on ``sys.meta_path`` for the first import of one top-level module, then leaves."""

    def __init__(self, module: str, packages: Sequence[str]):
        self.module = module
        self.packages = tuple(packages)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = _spec_from_others(self, fullname, path, target)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ImportingLoader(spec.loader, self.packages)
        return spec


def defer_while_importing(module: str, packages: Sequence[str]) -> None:
    """When top-level ``module`` is first imported (by anyone), its import runs inside ``deferring(packages)``;
    nothing when it is already imported or arranged."""
    with _LOCK:
        if module in sys.modules or any(isinstance(f, _OnceFinder) and f.module == module for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _OnceFinder(module, packages))
