"""The code uses only torch names and keywords that the floor release in setup.py has (issue 21).

``benchmarks/torch_floor.json`` records what a real install of the floor release resolved
(``python -m benchmarks.torch_floor --verify PYTHON``); a name or keyword the code reaches that the
record does not hold fails here, naming it, until it is verified against the floor release.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.torch_floor import RECORD, code_files, scan

ROOT = Path(__file__).resolve().parent.parent


def test_every_torch_api_in_the_code_was_found_in_the_floor_release():
    record = json.loads(RECORD.read_text(encoding="utf-8"))
    floor = re.search(r'"torch>=(\d+\.\d+)"', (ROOT / "setup.py").read_text(encoding="utf-8")).group(1)
    verified_with = record["torch"]
    assert verified_with.startswith(floor + "."), f"{RECORD.name} was verified with torch {verified_with}, not {floor}"
    assert not record["missing"] and not record["keywords_missing"], "the floor release lacks some of them"
    names, keywords = scan(code_files())
    verified = {tuple(pair) for pair in record["keywords"] + record["keywords_unverifiable"]}
    unverified = sorted(names - set(record["found"])) + [f"{n}({k}=)" for n, k in sorted(keywords - verified)]
    assert not unverified, (
        f"not verified against torch {floor}: {unverified}; run python -m benchmarks.torch_floor --verify "
        f"PYTHON_WITH_TORCH_{floor} (see its docstring)"
    )


def test_the_scan_sees_aliases_and_keywords(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
        "def f(x):\n    y = F.interpolate(x, size=(2, 2), antialias=True)\n    return nn.Linear(2, 3)(torch.cat([y]))\n"
    )
    names, keywords = scan([source])
    assert {"torch.nn.functional.interpolate", "torch.nn.Linear", "torch.cat"} <= names
    assert ("torch.nn.functional.interpolate", "antialias") in keywords
