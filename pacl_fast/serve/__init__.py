"""``pacl-fast serve``: segmentation over HTTP, with dynamic batching and a page to try it.

:mod:`pacl_fast.serve.app` (``create_app(segmenter, ServeSettings(...))``) assembles the FastAPI app
from :mod:`~pacl_fast.serve.routes` (an APIRouter), :mod:`~pacl_fast.serve.deps` (what routes read
from ``app.state``), :mod:`~pacl_fast.serve.errors` (the one error map), :mod:`~pacl_fast.serve.middleware`
(request ids, metrics), :mod:`~pacl_fast.serve.jobs` (the model's work) and :mod:`~pacl_fast.serve.render`
(the answers); :mod:`pacl_fast.serve.batcher` queues concurrent requests for the one thread that runs the
model; :mod:`pacl_fast.serve.inputs` makes what clients send safe; :mod:`pacl_fast.serve.cli` is the
command; :mod:`pacl_fast.serve.local` runs a server process on loopback for scripts and tests; ``static/``
is the page at ``/``. This package imports nothing itself, so ``pacl-fast --help`` loads neither FastAPI
nor torch.
"""
