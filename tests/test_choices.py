"""``pacl_fast.choices`` is the one list of every choice: the tables that implement each choice match it."""

import ast
import subprocess
import sys
from pathlib import Path

from pacl_fast import choices


def test_implementations_match_the_lists():
    from kernels.reference import TRAINING_FREE_METHODS as KERNEL_TRAINING_FREE
    from pacl_fast.data.segmentation import DATASETS
    from pacl_fast.encoders import DEFAULT_DTYPES
    from pacl_fast.methods import POSITIONAL_RESIZE
    from pacl_fast.protocols import PRESETS

    assert tuple(sorted(DATASETS)) == choices.DATASETS
    assert tuple(DEFAULT_DTYPES) == choices.ENCODERS
    assert tuple(POSITIONAL_RESIZE) == choices.TRAINING_FREE_METHODS
    assert KERNEL_TRAINING_FREE == choices.TRAINING_FREE_METHODS  # kernels/ may not import pacl_fast
    assert {protocol for protocol, _ in PRESETS} == set(choices.PROTOCOLS)
    assert choices.DEFAULT_TRAINING_FREE_METHOD in choices.TRAINING_FREE_METHODS
    from pacl_fast.proxyclip import ProxyCLIP
    from pacl_fast.vfm import SPECS

    assert (ProxyCLIP.method,) == choices.VFM_METHODS and tuple(SPECS) == choices.VFMS
    assert ("pacl", *choices.TRAINING_FREE_METHODS, *choices.VFM_METHODS) == choices.METHODS
    assert choices.DEFAULT_VFM in choices.VFMS


def test_choices_imports_only_the_standard_library():
    tree = ast.parse(Path(choices.__file__).read_text(encoding="utf-8"))
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    code = "import sys, pacl_fast.choices; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
