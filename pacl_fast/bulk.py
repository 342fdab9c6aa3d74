"""Bulk segmentation: files, folders, file lists and WebDataset shards, across ``torchrun`` ranks.

Every input image gets an output name (its *key*): a file given by path is its stem; a file found
in a folder is its path below the folder without the suffix; a file from a list is its path below
the list's common folder; a WebDataset sample is its ``__key__``. Outputs are
``OUT/<key>_labels.png`` (and ``OUT/<key>_overlay.png``), each written atomically, labels last,
so an image is done exactly when its labels file exists.

Sharing across ranks is by position in the deterministic input order (files) and by shard
(``shards[rank::world_size]``), decided before looking at what exists, so two ranks never
take the same image even while others are writing. A re-run skips every image whose outputs
exist: a killed job resumes, and the temporary files its killed writes left are removed
(:func:`pacl_fast.files.remove_stale_temporaries`: never a live rank's). ``OUT/.pacl-segment.json``
records the settings (model, labels, prompts, protocol), written once every setting is validated; a
run with other settings refuses to add to a folder holding label maps, rather than skip images made
differently (a folder where no label map was written takes the new settings). Beside them it records
the request (:func:`request_record`: every option the caller was given), which a finished rerun
must match to finish without loading the model (:func:`already_done`).

Inputs are hostile until proven otherwise, and one sample never stops the job:

* keys are made by :func:`pacl_fast.files.output_key` (a name that is not UTF-8 gets ``%XX`` for
  its odd bytes) and go through :func:`pacl_fast.files.output_path` (no absolute paths, ``..``
  anywhere, empty segments, control characters or over-long names; every output proven inside
  ``OUT``, links included); a bad key fails its sample, reported with its source;
* shards are read only by :func:`pacl_fast.data.shards.iterate_samples`: a member over
  ``max_member_bytes`` is never read and fails its sample, and so does a link that leads nowhere
  usable (links to regular members of the archive are read); a damaged shard fails the rest of that
  shard with one report, and the other shards go on;
* any exception while naming, decoding (a decompression bomb, a truncated file) or writing one
  sample fails that sample alone;
* two inputs with one key would write the same files: between files they are refused up front;
  a shard sample whose key is a file's, or a key already seen in this rank's shards, fails and
  names the first source. Shards are split across ranks, so the same key on two ranks is found
  only at the end of the run, after both wrote: it is reported as a failure naming both sources
  (the files hold one of the two). Detection costs about 150 bytes per shard sample on each rank.
* outputs of an earlier run found among the inputs (``--out`` inside an input folder) are left
  out, so a rerun never segments its own label maps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pacl_fast.data.shards import DEFAULT_MAX_MEMBER_BYTES, MemberNotRead, ShardError, is_shard, iterate_samples
from pacl_fast.distributed import DistInfo, gather_objects
from pacl_fast.files import atomic_write, output_key, remove_stale_temporaries
from pacl_fast.images import IMAGE_SUFFIXES, Prepared, SegmentationPreprocess, SlidingWindow, load_image
from pacl_fast.results import ImageError, Segmentation, output_files
from pacl_fast.runs import as_list, check_same_settings, fingerprint, progress_bar, rank_share, read_json
from pacl_fast.segmenter import Segmenter

logger = logging.getLogger(__name__)

#: WebDataset fields holding the image, in order of preference.
IMAGE_FIELDS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)
#: What a run writes next to each key; such files under OUT are never read back as inputs.
OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png")
#: Options of a bulk run that say what to read, where to write and how to report, never how a label
#: map is made: left out of :func:`request_record` (every other option is in it, new ones included).
NOT_SETTINGS = frozenset({"images", "file_list", "out", "overwrite", "quiet", "verbose", "workers"})


def printable(text: str) -> str:
    """``text``, or its ``repr`` when it holds control characters (names from data must not drive a terminal)."""
    return text if text.isprintable() else repr(text)


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class FileItem:
    key: str
    path: Path


@dataclass
class Inputs:
    """What a bulk run reads: image files with their keys, shards, and inputs refused up front."""

    files: list[FileItem] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (source, why)


def _key(path: Path, base: Path) -> str:
    return path.relative_to(base).with_suffix("").as_posix()


def _read_file_list(list_path: Path) -> list[Path]:
    """The paths in a file list, one a line, as absolute paths with ``..`` resolved on the names.

    Read as bytes and decoded as the file system decodes names, so a path that is not UTF-8 is read,
    not a codec error."""
    lines = [os.fsdecode(line.strip()) for line in list_path.read_bytes().splitlines()]
    return [Path(line) for line in lines if line]


def collect_inputs(paths: Sequence[str | os.PathLike], file_lists: Sequence[str | os.PathLike] = ()) -> Inputs:
    """Expand folders (recursively, image suffixes), file lists (one path a line) and shards, in order.

    Keys are made by :func:`pacl_fast.files.output_key`. An input whose key is not a safe output name
    (too long, control characters...) is refused, and so is the later of two inputs with the same key
    (they would write the same files).
    """
    inputs = Inputs()
    candidates: list[FileItem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                inputs.refused.append((printable(str(path)), f"folder has no images ({', '.join(IMAGE_SUFFIXES)})"))
            candidates.extend(FileItem(_key(p, path), p) for p in found)
        elif is_shard(path):
            inputs.shards.append(path)
        else:
            candidates.append(FileItem(path.stem, path))
    for file_list in file_lists:
        list_path = Path(file_list)
        if not list_path.is_file():
            raise FileNotFoundError(f"file list not found: {list_path}")
        listed = _read_file_list(list_path)
        if not listed:
            inputs.refused.append((printable(str(list_path)), "file list is empty"))
            continue
        absolute = [Path(os.path.abspath(p)) for p in listed]  # "../x" named, not a ".." key
        base = Path(os.path.commonpath([p.parent for p in absolute]))
        candidates.extend(FileItem(_key(a, base), p) for a, p in zip(absolute, listed))
    owner: dict[str, str] = {}
    for candidate in candidates:
        source = printable(str(candidate.path))
        try:
            item = FileItem(output_key(candidate.key), candidate.path)
        except ValueError as error:
            inputs.refused.append((source, f"cannot name its outputs: {error}"))
            continue
        if item.key in owner:
            inputs.refused.append((source, f"output name {item.key!r} is already taken by {owner[item.key]}"))
            continue
        owner[item.key] = source
        inputs.files.append(item)
    return inputs


def check_output_folder(path: str | os.PathLike, argument: str = "out_dir") -> None:
    """ValueError naming ``argument`` unless ``path`` is, or can become, a folder this process can write to.

    Checked before a model loads; nothing is left behind: a folder that does not exist yet is not
    made, its nearest existing parent is tried instead (with a file that has no name, or that is
    removed at once)."""
    path = Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if existing.is_file() or (existing.exists() and not existing.is_dir()):
        where = "is" if existing == path else f"is inside {existing}, which is"
        raise ValueError(f"{argument} {path} {where} a file, not a folder; give a folder for the outputs")
    if not existing.exists():
        raise ValueError(f"{argument} {path}: {existing} is a broken link")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == path else f" (cannot make it in {existing})"
        why = error.strerror or type(error).__name__
        raise ValueError(f"{argument} {path} is not writable{where}: {why}") from None


def _has_label_maps(folder: Path) -> bool:
    """Whether any ``*_labels.png`` lies under ``folder`` (an image a rerun would skip as done)."""
    return any(name.endswith(OUTPUT_SUFFIXES[0]) for _, _, names in os.walk(folder) for name in names)


class Outputs:
    """Where each key's files go, whether they are all there, and how they are written."""

    #: Settings the label maps in a folder were made with; skipping is only safe under the same ones.
    MANIFEST = ".pacl-segment.json"

    def __init__(self, directory: str | os.PathLike, overlays: bool = True):
        self.directory = Path(directory)
        self.overlays = overlays

    def claim(self, settings: dict, *, overwrite: bool, write: bool, request: dict | None = None) -> None:
        """Refuse to add to a folder of label maps made with other settings (they would be skipped as done).

        A settings file with no label map beside it (a run that wrote nothing) refuses nothing: the
        new settings replace it. ``write``: record the settings (one rank does; the others only check).
        ``request`` (:func:`request_record`, for :func:`already_done`) is recorded beside them but never
        compared here: touched weight files or another head backend make the same label maps.
        """
        manifest = self.directory / self.MANIFEST
        settings = fingerprint(settings)
        remedy = "images already there would be skipped as done; use another --out, or --overwrite"
        if not overwrite and (manifest.exists() or manifest.is_symlink()):
            try:
                saved = read_json(manifest)
            except (OSError, ValueError) as error:
                saved = f"cannot read the settings file {manifest} ({_error(error)}); {remedy}"
            if isinstance(saved, dict):
                saved = {key: value for key, value in saved.items() if key != "request"}
            if saved != settings and _has_label_maps(self.directory):
                if isinstance(saved, str):
                    raise ValueError(saved)
                check_same_settings(saved, settings, subject=f"the label maps in {self.directory} were", remedy=remedy)
        if write:
            try:
                atomic_write(manifest, json.dumps({**settings, "request": fingerprint(request)}, indent=1))
            except OSError as error:
                raise ValueError(f"cannot write the settings file {manifest}: {_error(error)}") from None

    def remove_stale_temporaries(self) -> None:
        """Remove what killed writes left under the folder; never a live rank's (see
        :func:`pacl_fast.files.remove_stale_temporaries`), so any rank may write meanwhile."""
        removed = remove_stale_temporaries(self.directory, recursive=True)
        if removed:
            logger.info("removed %d temporary files that killed writes left under %s", removed, self.directory)

    def paths(self, key: str) -> dict[str, Path]:
        """The key's output files, proven inside the folder (ValueError for an unsafe key)."""
        return output_files(self.directory, key, self.overlays)

    def done(self, key: str) -> bool:
        return all(p.is_file() for p in self.paths(key).values())

    def write(self, key: str, result: Segmentation) -> dict[str, Path]:
        return result.save(self.directory, key, overwrite=True)


@dataclass
class _Sample:
    """One input as loaded: an image to segment, a failure, or outputs already there."""

    key: str | None  # None: no usable output name
    source: str
    prepared: Prepared | None = None  # decoded, resized, normalised (in a DataLoader worker)
    error: str | None = None
    done: bool = False
    shard: int | None = None  # index of its shard in this rank's list; None for files


class _FileImages(Dataset):
    def __init__(self, items: Sequence[FileItem], preprocess: SegmentationPreprocess):
        self.items = list(items)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Sample:
        item = self.items[index]
        source = printable(str(item.path))
        try:
            return _Sample(item.key, source, prepared=self.preprocess(item.path))
        except Exception as error:  # this file fails alone
            return _Sample(item.key, source, error=_error(error))


def _decode(data: bytes, max_pixels: int) -> torch.Tensor:
    """Encoded image bytes -> ``[3, H, W]`` uint8; the size is checked before the pixels are decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return load_image(Image.open(io.BytesIO(data)), max_pixels=max_pixels)


class _ShardImages(IterableDataset):
    """This rank's shards, split again across DataLoader workers; done samples are not decoded."""

    def __init__(
        self,
        shards: Sequence[Path],
        outputs: Outputs,
        preprocess: SegmentationPreprocess,
        max_member_bytes: int,
        overwrite: bool,
    ):
        self.shards = list(enumerate(shards))
        self.outputs = outputs
        self.preprocess = preprocess
        self.max_member_bytes = max_member_bytes
        self.overwrite = overwrite

    def __iter__(self) -> Iterator[_Sample]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for index, shard in shards:
            read = 0
            try:
                for sample in iterate_samples(shard, max_member_bytes=self.max_member_bytes):
                    read += 1
                    yield self._load(index, shard, sample)
            except (ShardError, OSError) as error:
                why = str(error) if isinstance(error, ShardError) else f"cannot read shard {shard}: {_error(error)}"
                yield _Sample(
                    None, printable(str(shard)), error=f"{why}; the rest of the shard is skipped ({read} read)"
                )

    def _load(self, index: int, shard: Path, sample: dict) -> _Sample:
        source = printable(f"{shard}:{sample.get('__key__')}")
        try:
            key = output_key(sample.get("__key__"))
            self.outputs.paths(key)  # a safe name, inside OUT
        except Exception as error:
            return _Sample(None, source, error=f"cannot name its outputs: {_error(error)}", shard=index)
        try:
            if "__error__" in sample:
                raise ValueError(f"malformed sample: {sample['__error__']}")
            not_read = next((v for v in sample.values() if isinstance(v, MemberNotRead)), None)
            if not_read is not None:
                raise ValueError(str(not_read))
            if not self.overwrite and self.outputs.done(key):
                return _Sample(key, source, done=True, shard=index)
            name = next((f for f in IMAGE_FIELDS if f in sample), None)
            if name is None:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"sample has no image field ({fields})")
            try:
                image = _decode(sample[name], self.preprocess.max_pixels)
            except Exception as error:
                raise ValueError(f"cannot decode {name}: {_error(error)}") from error
            return _Sample(key, source, prepared=self.preprocess(image), shard=index)
        except Exception as error:  # this sample fails alone
            return _Sample(key, source, error=_error(error), shard=index)


@dataclass
class BulkSummary:
    """Counts over every rank; ``failures`` are ``(source, error)``; ``left_out``: earlier outputs among the inputs."""

    written: int
    skipped: int
    failures: list[tuple[str, str]]
    left_out: int = 0

    @property
    def total(self) -> int:
        return self.written + self.skipped + len(self.failures)


def _check_settings(
    segmenter: Segmenter,
    labels: Sequence[str],
    templates: str | Sequence[str],
    background_threshold: float | None,
    sliding_window: SlidingWindow | None,
    max_member_bytes: int,
) -> None:
    """Every setting, validated before anything is written (a typo must not leave a settings file behind)."""
    segmenter.check_options(sliding_window, background_threshold)
    if max_member_bytes < 1:
        raise ValueError(f"max_member_bytes must be >= 1, got {max_member_bytes}")
    segmenter.encode_labels(labels, templates)  # checks labels and templates (and caches their embeddings)


def _stamp(value: object) -> object:
    """A local file an option names, as ``[value, resolved path, size, mtime_ns]``; a ``local-dir:``
    CLIP as its name and its files' stamps; anything else as it is."""
    if isinstance(value, str) and value.startswith("local-dir:"):
        folder = Path(value[len("local-dir:") :])
        return [value, *(_stamp(str(p)) for p in sorted(folder.glob("*")))] if folder.is_dir() else value
    if isinstance(value, (str, os.PathLike)) and value and Path(value).is_file():
        info = Path(value).stat()
        return [os.fspath(value), str(Path(value).resolve()), info.st_size, info.st_mtime_ns]
    return value


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **_jsonable(asdict(value))}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__qualname__}:{value!r}"


def request_record(options: Mapping[str, Any]) -> dict:
    """What a bulk run was asked, as recorded in ``OUT/.pacl-segment.json`` and matched by :func:`already_done`.

    Every option is in it (``vars(args)`` of the CLI), but :data:`NOT_SETTINGS` and functions, so an
    option added later is compared without anyone listing it; each local file an option names (CLIP and
    PACL weights, a ``local-dir:`` CLIP's files) with its size and time. Anything that differs only
    makes the rerun load the model, which then compares the settings that make the label maps."""
    record = {
        name: _jsonable(_stamp(value))
        for name, value in sorted(options.items())
        if name not in NOT_SETTINGS and not callable(value)
    }
    return fingerprint(record)


def already_done(inputs: Inputs, out_dir: str | os.PathLike, overlays: bool, request: dict) -> int | None:
    """How many images a rerun would skip, if it would skip every one: every input is a file whose
    outputs exist and the folder's settings file records this same ``request`` (:func:`request_record`);
    None otherwise. Lets the CLI finish without loading a model or encoding text."""
    outputs = Outputs(out_dir, overlays)
    manifest = outputs.directory / Outputs.MANIFEST
    if inputs.shards or inputs.refused or not inputs.files or not manifest.is_file():
        return None
    try:
        saved = read_json(manifest)
        files, _ = _leave_out_outputs(inputs.files, outputs.directory)
        if not isinstance(saved, dict) or saved.get("request") != fingerprint(request):
            return None
        return len(files) if files and all(outputs.done(item.key) for item in files) else None
    except (OSError, ValueError):  # anything unreadable or unnamable: let the full run report it
        return None


def _leave_out_outputs(files: list[FileItem], out: Path) -> tuple[list[FileItem], int]:
    """Files minus those that are outputs under ``out`` (``*_labels.png`` / ``*_overlay.png``)."""
    root = out.resolve()
    kept = [f for f in files if not (f.path.name.endswith(OUTPUT_SUFFIXES) and f.path.resolve().is_relative_to(root))]
    return kept, len(files) - len(kept)


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class _Tally:
    """One rank's account: counts, failures, and the shard keys it has seen (to catch duplicates)."""

    def __init__(self, file_keys: dict[str, str], shards: Sequence[Path], failures: list[tuple[str, str]]):
        self.file_keys = file_keys  # every rank's file keys -> their source
        self.shards = shards
        self.failures = failures
        self.written = self.skipped = 0
        self.first_shard: dict[str, int] = {}  # shard key -> index of the shard that used it first here
        self.claimed: dict[str, tuple[str, bool]] = {}  # shard key -> (source, written) where outputs exist

    def take(self, sample: _Sample) -> bool:
        """Count a loaded sample; True when it is to be segmented."""
        if sample.shard is not None and sample.key is not None:
            owner = self.file_keys.get(sample.key)
            if owner is None and sample.key in self.first_shard:
                owner = printable(f"{self.shards[self.first_shard[sample.key]]}:{sample.key}")
            if owner is not None:
                self.failures.append((sample.source, f"output name {sample.key!r} is already taken by {owner}"))
                return False
            self.first_shard[sample.key] = sample.shard
        if sample.error is not None:
            self.failures.append((sample.source, sample.error))
        elif sample.done:
            self.skipped += 1
            if sample.shard is not None:
                self.claimed[sample.key] = (sample.source, False)
        return sample.error is None and not sample.done

    def wrote(self, sample: _Sample) -> None:
        self.written += 1
        if sample.shard is not None:
            self.claimed[sample.key] = (sample.source, True)

    def cross_rank_duplicates(self, dist: DistInfo) -> None:
        """Fail shard samples whose key a lower rank also wrote (or found done).

        Shards are split by rank, so only the end of the run sees these: every rank gathers 8-byte
        hashes of its keys with outputs, then the keys behind hashes that several ranks hold.
        """
        if not dist.enabled:
            return
        hashes = np.array(sorted({_key_hash(k) for k in self.claimed}), dtype=np.uint64)
        values, counts = np.unique(np.concatenate(gather_objects(hashes)), return_counts=True)
        shared = set(values[counts > 1].tolist())
        named = gather_objects({k: source for k, (source, _) in self.claimed.items() if _key_hash(k) in shared})
        for key, source in named[dist.rank].items():
            first = next(((r, part[key]) for r, part in enumerate(named[: dist.rank]) if key in part), None)
            if first is None:
                continue
            why = f"output name {key!r} is also used by {first[1]} on rank {first[0]}; its files hold one of the two"
            self.failures.append((source, why))
            if self.claimed[key][1]:
                self.written -= 1
            else:
                self.skipped -= 1


def _loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=as_list)


def segment_bulk(
    segmenter: Segmenter,
    inputs: Inputs,
    labels: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    templates: str | Sequence[str] = "imagenet",
    background_threshold: float | None = None,
    sliding_window: SlidingWindow | None = None,
    overlays: bool = True,
    overwrite: bool = False,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    dist: DistInfo | None = None,
    workers: int = 0,
    progress: bool = True,
    on_result: Callable[[str, str, Segmentation], None] | None = None,
    request: dict | None = None,
) -> BulkSummary:
    """Segment this rank's share of ``inputs`` into ``out_dir``; return the summary of all ranks.

    Args:
        max_member_bytes: a shard member larger than this is not read; its sample fails.
        on_result: ``on_result(key, source, segmentation)``, called after each image is written.
        request: what the caller was asked (:func:`request_record` of its options), recorded with the
            settings so that :func:`already_done` can skip a finished rerun without loading the model.
    """
    dist = dist or DistInfo()
    check_output_folder(out_dir)
    _check_settings(segmenter, labels, templates, background_threshold, sliding_window, max_member_bytes)
    outputs = Outputs(out_dir, overlays)
    settings = {
        "model": segmenter.model_id,
        "image_size": segmenter.image_size,
        "labels": list(labels),
        "templates": templates if isinstance(templates, str) else list(templates),
        "background_threshold": background_threshold,
        "sliding_window": None if sliding_window is None else asdict(sliding_window),
    }
    outputs.claim(settings, overwrite=overwrite, write=dist.is_main, request=request)
    if dist.is_main:
        outputs.remove_stale_temporaries()
    all_files, left_out = _leave_out_outputs(inputs.files, outputs.directory)
    if left_out:
        logger.info("left out %d earlier outputs (*_labels.png, *_overlay.png) found under %s", left_out, out_dir)
    file_keys = {item.key: printable(str(item.path)) for item in all_files}  # every rank's files
    shards = list(rank_share(inputs.shards, dist))
    tally = _Tally(file_keys, shards, list(inputs.refused) if dist.is_main else [])
    files = []
    for item in rank_share(all_files, dist):
        try:
            if not overwrite and outputs.done(item.key):
                tally.skipped += 1
                continue
        except (ValueError, OSError) as error:
            tally.failures.append((file_keys[item.key], f"cannot name its outputs: {_error(error)}"))
            continue
        files.append(item)
    bar = progress_bar("segment", dist, total=len(files) if not shards else None, enabled=progress)
    # Workers decode, resize and normalise; the main process only runs the model, batch_size images
    # of one canvas size at a time (Segmenter.segment_images).
    preprocess = segmenter.preprocessor(sliding_window, keep_images=overlays)
    loaders = [_loader(_FileImages(files, preprocess), segmenter.batch_size, workers)]
    if shards:
        dataset = _ShardImages(shards, outputs, preprocess, max_member_bytes, overwrite)
        loaders.append(_loader(dataset, segmenter.batch_size, min(workers, len(shards))))
    class_names = tuple(labels)
    class_embeddings = segmenter.encode_labels(class_names, templates)

    def segment(ready: list[_Sample]) -> list[Segmentation | ImageError]:
        if not ready:
            return []
        try:
            return segmenter.segment_images(
                [sample.prepared for sample in ready],
                class_names,
                class_embeddings,
                sources=[sample.source for sample in ready],
                names=[sample.key for sample in ready],
                sliding_window=sliding_window,
                background_threshold=background_threshold,
            )
        except Exception as error:  # the batch fails, the run goes on
            return [ImageError(i, sample.source, error) for i, sample in enumerate(ready)]

    for loader in loaders:
        for batch in loader:
            ready = [sample for sample in batch if tally.take(sample)]
            for sample, result in zip(ready, segment(ready)):
                if isinstance(result, ImageError):
                    tally.failures.append((sample.source, _error(result.error)))
                    continue
                try:
                    outputs.write(sample.key, result)
                except Exception as error:
                    tally.failures.append((sample.source, f"cannot write outputs: {_error(error)}"))
                    continue
                tally.wrote(sample)
                if on_result is not None:
                    on_result(sample.key, sample.source, result)
            bar.update(len(batch))
    bar.close()
    tally.cross_rank_duplicates(dist)
    parts = gather_objects((tally.written, tally.skipped, tally.failures))
    return BulkSummary(
        written=sum(p[0] for p in parts),
        skipped=sum(p[1] for p in parts),
        failures=[f for p in parts for f in p[2]],
        left_out=left_out,
    )
