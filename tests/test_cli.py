import dataclasses
import os
import subprocess
import sys
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
    from conftest import quiet_load_clip
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

    assert common.METHODS is choices.METHODS and common.ENCODERS is choices.ENCODERS
    assert common.DTYPES is choices.DTYPES and common.HEAD_BACKENDS is choices.HEAD_BACKENDS
    assert common.TEXT_DTYPES is choices.TEXT_DTYPES
    assert eval_command.DATASETS is choices.DATASETS and eval_command.PROTOCOLS is choices.PROTOCOLS
    assert export.EXPORT_FORMATS is choices.EXPORT_FORMATS and export.EXPORT_PRECISIONS is choices.EXPORT_PRECISIONS
    templates = next(f for f in dataclasses.fields(serve_command.ServeSettings) if f.name == "templates")
    assert templates.metadata["choices"] is choices.TEMPLATE_PRESETS
    assert common.METHODS == METHODS
    assert common.ENCODERS == ENCODERS
    assert eval_command.PROTOCOLS == PROTOCOLS
    assert sorted(eval_command.DATASETS) == sorted(DATASETS)

    def offered(command: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        return capsys.readouterr().out

    def listed(values) -> str:
        return "{" + ",".join(values) + "}"

    model = (choices.METHODS, choices.DTYPES, choices.HEAD_BACKENDS, choices.ENCODERS, choices.TEXT_DTYPES)
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
    assert main(["segment", str(tmp_path), "--labels", "a", "--out", "o", "--dtype", "int8"]) == 2
    assert "--dtype int8 runs on --encoder openvino only" in capsys.readouterr().err
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
    assert untouched == dataclasses.replace(defaults, templates="imagenet")
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
