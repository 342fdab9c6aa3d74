"""How ``pacl-fast`` ends: without the interpreter's seconds of teardown (issue 20, cold and warm)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def run_and_exit(main: Callable[[], int]) -> NoReturn:
    """``main()`` as the whole process (``pacl-fast``, ``python -m pacl_fast``), ending without the interpreter's
    teardown (issue 20, cold and warm): freeing every module and object of torch, open_clip and torchvision took
    1.5-5 s after the command's last line on the project's 2-core VM, as long as a warm one-image ``segment``'s
    work. What the teardown is for still runs, in the interpreter's order: it waits for threads still running,
    runs the ``atexit`` functions registered while ``main`` ran (temporary folders' finalizers, process pools),
    then the last one, registered here first, flushes the streams and logging and ends the process. An
    exception out of ``main`` (``PACL_FAST_DEBUG``'s traceback), or ``PACL_FAST_FULL_EXIT=1``: the ordinary exit.
    """
    import atexit

    done: list[int] = []

    def end_now() -> None:  # atexit runs the last registered first: this one after all the others
        if not done:
            return
        code = done[0]
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: the ordinary exit would fail to write it too
                code = code or 120
        os._exit(code)

    if not os.environ.get("PACL_FAST_FULL_EXIT"):
        atexit.register(end_now)
    code = main()
    done.append(code)
    raise SystemExit(code)
