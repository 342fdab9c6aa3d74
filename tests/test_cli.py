import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pacl_fast.cli import build_parser, main


def test_segment_writes_good_images_and_names_bad_ones(tmp_path, tiny_config, capsys, monkeypatch):
    import json

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config}))
    import torch
    from helpers import quiet_load_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(
        {k: v.contiguous() for k, v in quiet_load_clip(tiny_config).clip.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(good),
            str(bad),
            str(tmp_path / "gone.png"),
            "--labels",
            "cat,dog",
            "--out",
            str(out),
            "--clip",
            f"local-dir:{folder}",
            "--templates",
            "single",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "bad.png" in captured.err and "gone.png" in captured.err and "2 of 3 images failed" in captured.err
    assert "good.jpg: cat" in captured.out and "%" in captured.out
    assert Image.open(out / "good_labels.png").mode == "P"
    assert Image.open(out / "good_overlay.png").size == (60, 40)
    assert sorted(p.name for p in out.iterdir() if p.name != ".pacl-segment.json") == [
        "good_labels.png",
        "good_overlay.png",
    ]


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "x.png", "--labels", "a,,b", "--out", "o"])
    assert "--labels has an empty name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", "x.png", "--labels", "a", "--out", "o", "--sliding-window", "abc"])
    assert "--sliding-window expects" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["segment"], ["demo"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: pacl-fast" in capsys.readouterr().out


def test_demo_runs_as_a_console_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pacl_fast", "demo", "--out", str(tmp_path), "--num-images", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "scene1" in result.stdout and "mIoU over 2 fresh scenes" in result.stdout
    for name in ("scene0_overlay.png", "scene0.png", "scene1_labels.png"):
        assert (tmp_path / name).is_file(), name
    panel = Image.open(tmp_path / "scene0.png")  # photo | prediction | truth, upscaled, with a legend below
    assert panel.width >= 3 * 4 * 64 and panel.height > 4 * 64


def test_demo_panel_greys_out_what_is_not_scored_and_has_a_legend():
    from pacl_fast.data.synthetic import CLASS_NAMES, IGNORE_INDEX, WorldConfig, render_scene
    from pacl_fast.demo import DEMO_ZOOM, IGNORED_GREY, demo_panel
    from pacl_fast.results import palette

    scene = render_scene(0, 100, WorldConfig(image_size=64))
    prediction = np.where(scene.mask == IGNORE_INDEX, 0, scene.mask).astype(np.int16)
    panel = np.asarray(demo_panel(scene.image, prediction, scene.mask))
    title = 22  # the row of titles above the tiles
    tile = slice(title, title + 64 * DEMO_ZOOM)
    truth_tile = panel[tile, 8 + 2 * (64 * DEMO_ZOOM + 8) :][:, : 64 * DEMO_ZOOM]
    expected = (
        np.where(
            (scene.mask == IGNORE_INDEX)[..., None],
            np.array(IGNORED_GREY, np.uint8),
            palette(6)[np.clip(scene.mask, 0, 5)],
        )
        .repeat(DEMO_ZOOM, 0)
        .repeat(DEMO_ZOOM, 1)
    )
    assert np.array_equal(truth_tile, expected)
    legend = panel[title + 64 * DEMO_ZOOM :]
    for colour in palette(len(CLASS_NAMES)):  # every class's colour appears in the legend
        assert (legend == colour).all(-1).any()


def test_the_cli_choices_are_the_library_lists(capsys):
    """--help imports nothing heavy, so the CLI takes its choices from pacl_fast.choices (standard library
    only): the very tuples, not copies, and every parser offers exactly them."""
    from pacl_fast import choices
    from pacl_fast.cli import common, export
    from pacl_fast.cli import eval as eval_command
    from pacl_fast.cli import serve as serve_command
    from pacl_fast.data.segmentation import DATASETS
    from pacl_fast.encoders import ENCODERS
    from pacl_fast.methods import METHODS
    from pacl_fast.protocols import PROTOCOLS

    assert common.METHODS is choices.METHODS and common.ENCODER_CHOICES is choices.ENCODER_CHOICES
    assert common.DTYPE_CHOICES is choices.DTYPE_CHOICES and common.HEAD_BACKENDS is choices.HEAD_BACKENDS
    assert (choices.AUTO, *choices.ENCODERS) == choices.ENCODER_CHOICES  # auto, the default, then every backend
    assert (choices.AUTO, *choices.DTYPES) == choices.DTYPE_CHOICES
    assert common.TEXT_DTYPES is choices.TEXT_DTYPES
    assert eval_command.DATASETS is choices.DATASETS and eval_command.PROTOCOLS is choices.PROTOCOLS
    assert export.EXPORT_FORMATS is choices.EXPORT_FORMATS and export.EXPORT_PRECISIONS is choices.EXPORT_PRECISIONS
    templates = next(f for f in dataclasses.fields(serve_command.ServeSettings) if f.name == "templates")
    assert templates.metadata["choices"] is choices.TEMPLATE_PRESETS
    assert common.METHODS == METHODS
    assert choices.ENCODERS == ENCODERS
    assert eval_command.PROTOCOLS == PROTOCOLS
    assert sorted(eval_command.DATASETS) == sorted(DATASETS)

    def offered(command: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        return capsys.readouterr().out

    def listed(values) -> str:
        return "{" + ",".join(values) + "}"

    model = (choices.METHODS, choices.DTYPE_CHOICES, choices.HEAD_BACKENDS, choices.ENCODER_CHOICES,
             choices.TEXT_DTYPES)  # fmt: skip
    for command in ("segment", "eval", "classify", "serve"):
        text = offered(command)
        assert all(listed(values) in text for values in model), command
    eval_text = offered("eval")
    assert listed(choices.DATASETS) in eval_text and listed(choices.PROTOCOLS) in eval_text
    assert listed(choices.EXPORT_FORMATS) in offered("export")
    assert listed(choices.TEMPLATE_PRESETS) in offered("serve")


def test_help_is_instant_and_imports_no_torch():
    code = "import sys, pacl_fast.cli as c; c.build_parser(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    code = main(
        ["segment", str(tmp_path), "--labels", "a", "--out", str(tmp_path / "o"), "--pacl-weights", str(missing)]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"--pacl-weights {missing}: no such file" in err and "train/train.py" in err
    assert "Traceback" not in err
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert main(["segment", str(tmp_path), "--labels", "a", "--out", "o", "--pacl-weights", str(weights),
                 "--method", "naclip"]) == 2  # fmt: skip
    assert "--pacl-weights is used only by --method pacl" in capsys.readouterr().err
    # int8 is OpenVINO's: with --encoder auto (the default) it chooses OpenVINO; another encoder named is refused
    assert main(["segment", str(tmp_path), "--labels", "a", "--out", "o", "--encoder", "torch", "--dtype", "int8"]) == 2
    assert "--dtype int8 runs on --encoder openvino only, not torch" in capsys.readouterr().err
    assert main(["eval", "--dataset", "voc21", "--protocol", "naclip", "--templates", "single"]) == 2
    assert "--protocol naclip sets --templates: leave them out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", "x.png", "--labels", "a", "--out", "o", "--image-size", "0"])
    assert "--image-size must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", "x.png", "--labels", "a", "--out", "o", "--encoder", "jax"])
    assert "invalid choice: 'jax'" in capsys.readouterr().err


def test_a_finished_rerun_skips_without_loading_the_model(tmp_path, tiny_config, capsys):
    """Issue 10 item 14: a rerun whose outputs all exist used to build the CLIP and encode the text first."""
    from layouts import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(photos / f"p{i}.png")
    argv = ["segment", str(photos), "--labels", "a,b", "--out", str(tmp_path / "out"), "--clip", f"local-dir:{clip}"]
    argv += ["--templates", "single", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "3 written" in first.out and "Segmenter(method=naclip" in first.err
    assert main(argv) == 0
    again = capsys.readouterr()
    assert "0 written, 3 skipped" in again.out and "Segmenter(" not in again.err  # no model was built
    assert main([*argv[:3], "a,c", *argv[4:]]) == 2  # other labels: the full run starts and refuses the folder
    assert "Segmenter(" in capsys.readouterr().err
    (tmp_path / "out" / "p1_labels.png").unlink()  # one output missing: a full run writes it
    assert main(argv) == 0
    again = capsys.readouterr()
    assert "1 written, 2 skipped" in again.out and "Segmenter(" in again.err
    for path in clip.iterdir():  # weight files touched (same content): the request differs, the settings do not
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 60))
    assert main([*argv, "--backend", "reference"]) == 0, capsys.readouterr().err
    again = capsys.readouterr()
    assert "0 written, 3 skipped" in again.out and "Segmenter(" in again.err


#: Every help screen of the command line, as a user sees it at 100 columns (see test_help_output_is_unchanged).
ROOT = Path(__file__).resolve().parents[1]
HELP_GOLDEN = ROOT / "tests" / "data" / "cli_help.txt"
HELP_COMMANDS = (
    ["-m", "pacl_fast"],
    *(["-m", "pacl_fast", name] for name in ("segment", "demo", "eval", "classify", "export", "serve")),
    ["-m", "pacl_fast.serve"],
)


def help_screens() -> str:
    """``python -m pacl_fast [COMMAND] --help`` and ``python -m pacl_fast.serve --help`` at ``COLUMNS=100``,
    each under a ``$ ...`` line."""
    env = {**os.environ, "COLUMNS": "100", "LINES": "50"}
    screens = []
    for command in HELP_COMMANDS:
        result = subprocess.run(
            [sys.executable, *command, "--help"], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
        )
        assert result.returncode == 0 and not result.stderr, (command, result.stderr)
        screens.append(f"$ python {' '.join(command)} --help\n{result.stdout}")
    return "\n".join(screens)


def test_help_output_is_unchanged():
    """Every command's options, defaults and help text stay as they were (issue 22: the CLI was split into a
    package without changing what users see).

    When help text must change on purpose, regenerate the golden file and commit it with the change, saying
    why in the commit message (the diff of tests/data/cli_help.txt is the review of the change)::

        PACL_FAST_UPDATE_HELP=1 python -m pytest tests/test_cli.py -k help_output_is_unchanged

    (the test then rewrites the file and skips). The screens depend on argparse's formatting, so the file
    is made with the Python of the project's venv (3.11).
    """
    screens = help_screens()
    if os.environ.get("PACL_FAST_UPDATE_HELP"):
        HELP_GOLDEN.parent.mkdir(exist_ok=True)
        HELP_GOLDEN.write_text(screens)
        pytest.skip(f"rewrote {HELP_GOLDEN}")
    expected = HELP_GOLDEN.read_text()
    assert screens == expected


def test_cli_modules_use_no_private_names_of_other_modules():
    """Issue 22: the command modules import no ``_name`` from another module and reach into no private
    attribute (argparse's ``_actions`` was rewritten in place by the old serve command). The one hook
    allowed is ``HelpFormatter._get_help_string``, which argparse's own ArgumentDefaultsHelpFormatter
    overrides the same way (``common.HELP``)."""
    import ast

    sources = [*sorted((ROOT / "pacl_fast" / "cli").glob("*.py")), ROOT / "pacl_fast" / "serve" / "__main__.py"]
    assert len(sources) >= 8
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute):
                name = node.attr
                allowed = name == "_get_help_string" and path.name == "common.py"
                assert allowed or not (name.startswith("_") and not name.endswith("__")), f"{path.name} uses .{name}"


def _serve_parser(settings=None):
    import argparse

    from pacl_fast.cli import HELP, serve

    parser = argparse.ArgumentParser(prog="serve", formatter_class=HELP)
    if settings is None:
        serve.configure_parser(parser)
    else:
        serve.add_settings_options(parser, settings)
    return parser


def test_serve_options_are_the_settings_fields(capsys):
    """Issue 22: every ServeSettings field is a serve option of its name, typed by the field, checked by the
    settings' own __post_init__, and copied back without a hand-written list."""
    from pacl_fast.cli.serve import settings_from_args
    from pacl_fast.serve.settings import ServeSettings

    defaults = ServeSettings()
    argv, expected = [], {}
    for spec in dataclasses.fields(ServeSettings):
        value = getattr(defaults, spec.name)
        flag = "--" + spec.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append("--no-" + flag[2:] if value else flag)
            expected[spec.name] = not value
        elif spec.metadata.get("choices"):
            expected[spec.name] = next(c for c in spec.metadata["choices"] if c != value)
            argv += [flag, expected[spec.name]]
        else:
            expected[spec.name] = type(value)(value * 3 + 1)
            argv += [flag, str(expected[spec.name])]
    assert len(expected) == len(dataclasses.fields(ServeSettings)) >= 11
    settings = settings_from_args(_serve_parser().parse_args([*argv, "--clip", "demo"]))
    assert dataclasses.asdict(settings) == expected
    untouched = settings_from_args(_serve_parser().parse_args([]))
    assert untouched == defaults and untouched.templates is None  # None: each request gets the model's
    for bad in (["--max-label-chars", "0"], ["--max-windows", "-1"], ["--max-wait-ms", "-1"], ["--timeout", "0"],
                ["--max-batch", "2.5"], ["--timeout", "soon"]):  # fmt: skip
        with pytest.raises(SystemExit):
            _serve_parser().parse_args(bad)
        err = capsys.readouterr().err
        assert f"{bad[0]} must be" in err and "Traceback" not in err, err


def test_a_new_settings_field_gets_its_option_by_itself(capsys):
    """What another engineer adds to ServeSettings with metadata={"help": ...} is an option with no CLI edit."""
    from pacl_fast.cli.serve import settings_from_args
    from pacl_fast.serve.settings import ServeSettings

    @dataclasses.dataclass(frozen=True)
    class Wider(ServeSettings):
        body_deadline: float = dataclasses.field(default=10.0, metadata={"help": "seconds for a request body"})
        body_readers: int | None = dataclasses.field(default=None, metadata={"help": "bodies read at once"})

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.body_deadline > 0:
                raise ValueError(f"body_deadline must be > 0 seconds, got {self.body_deadline!r}")

    parser = _serve_parser(Wider)
    args = parser.parse_args(["--body-deadline", "2.5", "--body-readers", "4", "--max-batch", "3"])
    args.clip = "ViT-B-16"
    settings = settings_from_args(args, Wider)
    assert (settings.body_deadline, settings.body_readers, settings.max_batch) == (2.5, 4, 3)
    assert "seconds for a request body (default: 10.0)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--body-deadline", "0"])
    assert "--body-deadline must be > 0 seconds, got 0.0" in capsys.readouterr().err

    @dataclasses.dataclass(frozen=True)
    class Undocumented(ServeSettings):
        secret: int = 3

    with pytest.raises(TypeError, match=r"Undocumented.secret needs metadata=\{'help': ...\}"):
        _serve_parser(Undocumented)


# ------------------------------------------------------------------ what a user reads: stderr, Ctrl-C, early checks

DEMO = ["--clip", "demo", "--device", "cpu"]
#: A tqdm bar as its last refresh leaves it: "segment: 100%|#####| 1/1 [...]".
PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")


def _env(cache: Path | None = None) -> dict:
    """The environment of a command run as a user runs it; ``cache``: its own cache folder (exported encoders,
    text), so that what ``--encoder auto`` finds cached there does not depend on which tests ran before."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return env if cache is None else {**env, "PACL_FAST_CACHE": str(cache)}


#: What the first line says about the model with no speed options (issues 20 and 24 item 8): its display name,
#: the encoder and precision chosen, the model's defaults that change answers, and why that encoder.
CHOICE = re.compile(r"clip=demo, pacl=trained, .*encoder=\w+, dtype=(fp32|bf16|fp16), .*"
                    r"templates=synthetic, background_threshold=0\.95, why='(?!as given)[^']+'\)$")  # fmt: skip


def announced_count(line: str) -> str | None:
    """How many images the command told ``--encoder auto`` to expect, as its reason says (None: not said)."""
    match = re.search(r"(\d+ images|an unending stream of images)", line)
    return match[1] if match else None


def shown(stderr: str) -> list[str]:
    """stderr as a terminal shows it: each line as its last carriage return left it, blank lines dropped."""
    lines = (line.rsplit("\r", 1)[-1].rstrip() for line in stderr.split("\n"))
    return [line for line in lines if line]


def _photo(folder: Path, name: str = "photo.png", seed: int = 0, size: tuple[int, int] = (48, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("command", ["segment", "eval", "export"])
def test_stderr_starts_with_our_line_and_holds_nothing_else(command, tmp_path):
    """Issue 24 item 2: no open_clip INFO lines before ours (13 of them), no ONNX 'Replaced initializer' lines
    (184): the first stderr line says what runs (issue 20: with no options, which encoder and precision were
    chosen and why; issue 24 item 8: the model by a name that says something), then only our lines and the
    progress bar."""
    state = tmp_path / "state"
    argv = {
        "segment": ["segment", str(_photo(tmp_path)), "--labels", "circle,square", "--out", str(tmp_path / "out")],
        "eval": ["eval", "--dataset", "synthetic", "--limit", "2", "--workers", "0", "--state-dir", str(state)],
        "export": ["export", "--format", "onnx", "--out", str(tmp_path / "export")],
    }[command]
    result = subprocess.run([sys.executable, "-m", "pacl_fast", *argv, *DEMO], cwd=ROOT, env=_env(tmp_path / "cache"),
                            capture_output=True, timeout=600)  # fmt: skip
    stderr = result.stderr.decode()  # not text=True: it would turn the bar's carriage returns into new lines
    assert result.returncode == 0, stderr[-3000:]
    lines = shown(stderr)
    export = "pacl-fast: export onnx fp32 of method=pacl, clip=demo, "
    first = export if command == "export" else "pacl-fast: Segmenter("
    assert lines[0].startswith(first), lines[:3]
    assert "method=pacl" in lines[0] and CHOICE.search(lines[0]) or command == "export", lines[0]
    assert "sha256" not in lines[0] and "custom-" not in lines[0], lines[0]
    if command != "export" and "OpenVINO installed" in lines[0]:  # the work announced to --encoder auto
        assert announced_count(lines[0]) == {"segment": "1 images", "eval": "2 images"}[command], lines[0]
    assert all(line.startswith("pacl-fast: ") or PROGRESS.match(line) for line in lines), lines
    # segment, eval: ours and the bar; export: ours, one line per tower it exports, the bar
    assert len(lines) == {"segment": 2, "eval": 2, "export": 4}[command], lines


def test_serve_stderr_starts_with_where_it_listens(tmp_path):
    """serve: the first line is ours and names the real URL (--port 0 included); uvicorn's start and stop
    lines are gone, its access log is not (the service's own output)."""
    import queue
    import signal
    import threading

    import httpx

    process = subprocess.Popen([sys.executable, "-m", "pacl_fast", "serve", "--port", "0", *DEMO], cwd=ROOT,
                               env=_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stderr], daemon=True).start()
    seen = []
    try:
        while not seen or seen[-1] != "pacl-fast: ready":
            seen.append(lines.get(timeout=300))
        match = re.match(r"pacl-fast: serving (http://127\.0\.0\.1:(\d+)/) ", seen[0])
        assert match and int(match[2]) > 0, seen
        assert httpx.get(match[1] + "readyz", timeout=30, trust_env=False).status_code == 200
        seen.append(lines.get(timeout=30))  # the access log line of that request
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    assert seen[1].startswith("pacl-fast: model loaded: Segmenter(method=pacl") and CHOICE.search(seen[1]), seen
    if "OpenVINO installed" in seen[1]:
        assert announced_count(seen[1]) == "an unending stream of images", seen[1]
    # A service runs without end, so --encoder auto picks an exported encoder where one is installed: the lines
    # of its one-time build (a fresh cache here) come before ready, and nothing else does.
    builds = seen[2:-2]
    assert all(re.match(r"pacl-fast: (OpenVINO|ONNX): building .*, once \(cached in ", line) for line in builds), seen
    assert ("encoder=openvino" in seen[1]) == bool(builds), seen
    assert seen[-2] == "pacl-fast: ready", seen
    assert re.fullmatch(r'pacl-fast: 127\.0\.0\.1:\d+ - "GET /readyz HTTP/1\.1" 200', seen[-1]), seen


def test_verbose_shows_other_libraries_info_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACL_FAST_CACHE", str(tmp_path / "cache"))  # no encoder cached: auto runs eager torch
    argv = ["segment", str(_photo(tmp_path)), "--labels", "circle,square", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, *DEMO]) == 0
    quiet = shown(capsys.readouterr().err)
    assert quiet[0].startswith("pacl-fast: Segmenter(") and len(quiet) <= 2, quiet
    assert main([*argv, *DEMO, "--overwrite", "--verbose"]) == 0
    verbose = shown(capsys.readouterr().err)
    assert len(verbose) >= len(quiet) + 5 and any("model config" in line for line in verbose), verbose


def test_ctrl_c_says_what_was_written_and_that_the_same_command_resumes(tmp_path):
    """Issue 24 item 9: Ctrl-C used to print 'interrupted' inside the progress bar, with no count and no word
    on resuming."""
    import signal

    for i in range(300):
        _photo(tmp_path / "photos", f"p{i:03d}.png", seed=i, size=(24, 24))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pacl_fast", "segment", str(tmp_path / "photos"), "--labels", "circle,square"]
    argv += ["--out", str(out), "--batch-size", "1", "--templates", "single", *DEMO]
    env = _env(tmp_path / "cache")  # 300 images: --encoder auto builds an OpenVINO model where it is installed
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(3):  # a line per image written
        assert b": circle" in process.stdout.readline()
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1].decode()  # bytes: the bar's carriage returns stay as they are
    assert process.returncode == 130, stderr[-2000:]
    match = re.search(r"\npacl-fast segment: interrupted: (\d+) images written to (\S+); run the same command "
                      r"again to resume \(images already written are skipped\)\n$", stderr)  # fmt: skip
    assert match and match[2] == str(out), stderr[-2000:]
    assert "Traceback" not in stderr
    written = len(list(out.glob("*_labels.png")))
    assert 3 <= int(match[1]) <= written <= int(match[1]) + 1 < 300  # the last one may be written, not yet counted
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{300 - written} written, {written} skipped (already written), 0 failed" in again.stdout


def test_results_without_json_name_no_file(tmp_path, capsys, monkeypatch):
    """Issue 24 item 9: eval and classify without --json ended with 'wrote None'."""
    monkeypatch.chdir(tmp_path)  # eval keeps its partial results in ./pacl-eval-synthetic.partial
    argv = ["eval", "--dataset", "synthetic", "--limit", "2", "--workers", "0", *DEMO]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "wrote" not in out
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    assert f"wrote {tmp_path / 'r.json'}" in capsys.readouterr().out
    assert main(["classify", str(_photo(tmp_path)), "--labels", "circle,square", *DEMO]) == 0
    out = capsys.readouterr().out
    assert "PACL" in out and "wrote" not in out


def test_what_needs_no_model_is_checked_before_it_loads(tmp_path, capsys):
    """Issue 24 item 7: a missing image, duplicate labels, a bad template, options that do not fit the dataset
    were reported after the model loaded (a missing image left an empty output folder)."""
    out = tmp_path / "out"
    photo = _photo(tmp_path)
    assert main(["segment", str(tmp_path / "gone.png"), "--labels", "circle,square", "--out", str(out), *DEMO]) == 1
    captured = capsys.readouterr()
    assert "0 written, 0 skipped (already written), 1 failed" in captured.out
    assert f"{tmp_path / 'gone.png'}: no such file" in captured.err
    assert "Segmenter(" not in captured.err and not out.exists()
    for labels, said in (("circle,square,circle", "--labels has 'circle' twice"),
                         ("circle,Square,square", "--labels has 'Square' and 'square', one name"),
                         ("dark  car,Dark car", "--labels has 'dark  car' and 'Dark car', one name")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["segment", str(photo), "--labels", labels, "--out", str(out), *DEMO])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
    segment = ["segment", str(photo), "--labels", "a,b", "--out", str(out)]
    refused = [
        ([*segment, "--templates", "a photo"], "--templates 'a photo'"),
        ([*segment, "--encoder", "onnxruntime", "--text-dtype", "bfloat16"], "--text-dtype applies to the torch"),
        (["eval", "--dataset", "synthetic", "--background-threshold", "0.5"], "synthetic has no background class"),
        (["eval", "--dataset", "synthetic", "--templates", "a photo"], "--templates 'a photo'"),
        (["classify", str(photo), "--labels", "a,b", "--templates", "a photo"], "--templates 'a photo'"),
    ]  # fmt: skip
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\n")
    refused.append((["eval", "--dataset", "synthetic", "--class-names", str(names)], "names 2 classes; synthetic has"))
    for argv, said in refused:
        assert main([*argv, *DEMO]) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Segmenter(" not in err, (argv, err)
    assert not out.exists()
    for bad in (["--workers", "-1"], ["--labels", "a", "--top-k", "0"]):
        with pytest.raises(SystemExit):
            main(["classify" if "--top-k" in bad else "segment", str(photo), "--labels", "a", "--out", "o", *bad])
        assert f"{bad[-2]} must be" in capsys.readouterr().err


#: --labels where the CLI's old hand rule (casefold, whitespace collapsed) and the library's (CLIP's tokenizer) split:
#: the tokenizer keeps 'Straße' and 'STRASSE' apart (it lowercases, it does not casefold ß to ss), and makes one text
#: of punctuation spacing, composed and decomposed accents, HTML entities.
LABELS_THE_RULES_SPLIT_ON = [
    ("Straße,STRASSE", None),
    ("road,stop sign!,stop sign !", ("stop sign!", "stop sign !")),
    ("café,cafe\u0301", ("café", "cafe\u0301")),
    ("fish &amp; chips,fish & chips", ("fish &amp; chips", "fish & chips")),
]


@pytest.mark.parametrize("text,pair", LABELS_THE_RULES_SPLIT_ON)
def test_cli_labels_follow_the_librarys_duplicate_rule(tmp_path, capsys, text, pair):
    """``--labels`` refuses exactly what ``validate_labels`` refuses (one rule, ``prompts.same_to_tokenizer``), in
    the CLI's one line naming both labels; what the library takes, the CLI takes, through every check it makes
    before the model loads."""
    from pacl_fast.cli import common
    from pacl_fast.prompts import validate_labels

    labels = [label.strip() for label in text.split(",")]
    argv = ["segment", str(_photo(tmp_path)), "--labels", text, "--out", str(tmp_path / "out")]
    if pair is None:
        assert validate_labels(labels) == tuple(labels)
        args = build_parser().parse_args(argv)
        assert args.labels == labels
        common.check_text(args.labels, None)  # the CLI's second check before the model: no UsageError
        return
    with pytest.raises(ValueError, match="duplicates to the tokenizer"):
        validate_labels(labels)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *DEMO])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"--labels has {pair[0]!r} and {pair[1]!r}, one name to CLIP's tokenizer: give each class once" in err
    assert "Segmenter(" not in err and not (tmp_path / "out").exists()


def test_a_busy_port_is_one_line_before_the_model_loads(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), *DEMO]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on --host 127.0.0.1 --port {port}" in err and "model loaded" not in err
    assert len(err.splitlines()) == 2  # the error and the PACL_FAST_DEBUG hint


def test_pacl_weights_of_another_clip_name_the_option_that_allows_them(tmp_path, capsys):
    """Issue 24 item 9: the error advised strict_clip=False, which the command line had no option for."""
    import json

    from layouts import write_tiny_clip

    from pacl_fast.build import DEMO_CLIP, DEMO_PACL

    config = json.loads((DEMO_CLIP / "open_clip_config.json").read_text())["model_cfg"]
    other = write_tiny_clip(tmp_path / "other-clip", config, seed=5)  # the demo's shape, other weights
    argv = ["segment", str(_photo(tmp_path)), "--labels", "circle,square", "--out", str(tmp_path / "out")]
    argv += ["--clip", f"local-dir:{other}", "--pacl-weights", str(DEMO_PACL), "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds PACL weights for CLIP" in err and "or pass --no-strict-clip if you know" in err
    assert "strict_clip=False" not in err
    assert main([*argv, "--no-strict-clip"]) == 0
    assert "1 written" in capsys.readouterr().out


def test_timings_line_says_where_the_seconds_went(tmp_path, capsys, monkeypatch):
    """``PACL_FAST_TIMINGS=1`` (issue 20): one stderr line at the end, every phase of the real command and the
    total they add up to; the text is charged to ``text`` the first time and comes from the cache the second."""
    from pacl_fast.cli.common import Timings

    monkeypatch.setenv("PACL_FAST_TIMINGS", "1")
    monkeypatch.setenv("PACL_FAST_CACHE", str(tmp_path / "cache"))
    photo = _photo(tmp_path)
    lines = []
    for run in ("cold", "warm"):
        argv = ["segment", str(photo), "--labels", "circle,square", "--out", str(tmp_path / run), *DEMO]
        assert main(argv) == 0
        lines.append([line for line in capsys.readouterr().err.splitlines() if "timings:" in line])
    parts = []
    for found in lines:
        assert len(found) == 1 and found[0].startswith("pacl-fast: timings: imports "), found
        seconds = dict(part.rsplit(" ", 2)[:2] for part in found[0].split("timings: ")[1].split(", "))
        assert list(seconds)[:5] == ["imports", "model", "text", "images", "writing"] and "other" in seconds
        seconds = {name: float(value) for name, value in seconds.items()}
        assert abs(sum(v for k, v in seconds.items() if k != "total") - seconds["total"]) <= 0.01 * len(seconds)
        assert all(value >= 0 for value in seconds.values())
        parts.append(seconds)
    assert parts[0]["model"] > 0 and parts[0]["images"] > 0  # writing: a small PNG can take under 5 ms (0.00)
    assert parts[1]["text"] < parts[0]["text"]  # the second run reads the text cache
    # Each second goes to the innermost phase: an import inside a phase is the imports', not the phase's.
    (tmp_path / "slow_to_import_probe.py").write_text("import time\ntime.sleep(0.3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    timings = Timings()
    started = timings.seconds["imports"]
    timings.install()
    try:
        with timings.phase("model"):
            import slow_to_import_probe  # noqa: F401

            time.sleep(0.1)
    finally:
        timings.uninstall()
    assert 0.1 <= timings.seconds["model"] < 0.38 and timings.seconds["imports"] - started >= 0.3


def test_run_and_exit_runs_what_teardown_is_for_and_skips_the_rest(tmp_path):
    """``pacl-fast`` ends without the interpreter's teardown (seconds of freeing torch): the exit code, the
    atexit functions, temporary folders' finalizers and unflushed output still happen; a thread still running
    is waited for, as the ordinary exit does."""
    script = (
        "import atexit, sys, tempfile, threading, time\n"
        "from pathlib import Path\n"
        "from pacl_fast.process_exit import run_and_exit\n"
        "atexit.register(lambda: Path(sys.argv[5]).write_text('teardown'))  # before: the skipped teardown's turn\n"
        "def main():\n"
        "    folder = tempfile.TemporaryDirectory()\n"
        "    Path(sys.argv[1]).write_text(folder.name)\n"
        "    atexit.register(lambda: Path(sys.argv[2]).write_text('ran'))\n"
        "    if sys.argv[3] == 'thread':\n"
        "        threading.Thread(target=lambda: (time.sleep(0.3), Path(sys.argv[4]).write_text('done'))).start()\n"
        "    sys.stdout.write('unflushed')\n"
        "    return 3\n"
        "run_and_exit(main)\n"
    )
    for mode in ("alone", "thread"):
        names, ran, done = tmp_path / f"{mode}-tmp", tmp_path / f"{mode}-atexit", tmp_path / f"{mode}-thread"
        teardown = tmp_path / f"{mode}-teardown"
        result = subprocess.run([sys.executable, "-c", script, str(names), str(ran), mode, str(done), str(teardown)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 3 and result.stdout == "unflushed", (result.stdout, result.stderr)
        assert ran.read_text() == "ran" and not Path(names.read_text()).exists()
        assert done.is_file() == (mode == "thread")
        assert not teardown.exists()  # what was registered before run_and_exit (the teardown's turn) is skipped


def test_a_missing_optional_package_is_one_line_naming_the_pip_command(capsys, monkeypatch):
    """An option whose package is not installed (OpenCV for --protocol, timm for a VFM...) ended in a
    ModuleNotFoundError traceback: now one line naming the module and how to install it."""
    import argparse
    import importlib

    from pacl_fast.cli.common import run_command

    def needs(module: str):
        return lambda args: importlib.import_module(module) and 0

    monkeypatch.setitem(sys.modules, "cv2", None)  # how Python marks a module as not installed
    assert run_command("segment", needs("cv2"), argparse.Namespace()) == 2
    err = capsys.readouterr().err
    assert err.startswith("pacl-fast segment: error: these options need the Python package 'cv2'")
    assert "pip install opencv-python-headless" in err and "Traceback" not in err
    assert run_command("eval", needs("no_such_package_xyz"), argparse.Namespace()) == 2
    assert "pip install no_such_package_xyz" in capsys.readouterr().err
