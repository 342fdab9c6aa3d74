"""``pacl-fast serve``: segmentation over HTTP, with dynamic batching and a page to try it.

``create_app(segmenter, ServeSettings(...))`` is the FastAPI app (:mod:`pacl_fast.serve.app`);
:mod:`pacl_fast.serve.batcher` queues concurrent requests for the one thread that runs the model;
:mod:`pacl_fast.serve.inputs` makes what clients send safe; ``static/`` is the page at ``/``.
Names are imported on first use, so ``pacl-fast --help`` does not load FastAPI or torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_app": "pacl_fast.serve.app",
    "label_map_from_png": "pacl_fast.serve.app",
    "ServeSettings": "pacl_fast.serve.settings",
    "Batcher": "pacl_fast.serve.batcher",
    "add_serve_parser": "pacl_fast.serve.cli",
    "run_serve": "pacl_fast.serve.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pacl_fast.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
