"""Bulk segmentation: files, folders, file lists and WebDataset shards, across ``torchrun`` ranks.

Every input image gets an output name (its *key*): a file given by path is its stem; a file found
in a folder is its path below the folder without the suffix; a file from a list is its path below
the list's common folder; a WebDataset sample is its ``__key__``. Outputs are
``OUT/<key>_labels.png`` (and ``OUT/<key>_overlay.png``), each written to a temporary name and
renamed, labels last, so an image is done exactly when its labels file exists.

Sharing across ranks is by position in the deterministic input order (files) and by shard
(``shards[rank::world_size]``), decided before looking at what exists, so two ranks never
take the same image even while others are writing. A re-run skips every image whose outputs
exist: a killed job resumes. ``OUT/.pacl-segment.json`` records the settings (model, labels,
prompts, protocol), and a run with other settings refuses to add to that folder rather than
skip images made differently. A bad image is reported and the rest still complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from pacl_fast.distributed import DistInfo, gather_objects
from pacl_fast.images import IMAGE_SUFFIXES, SlidingWindow, load_image
from pacl_fast.results import ImageError, Segmentation
from pacl_fast.segmenter import Segmenter

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: WebDataset fields holding the image, in order of preference.
IMAGE_FIELDS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)


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


def _is_shard(path: Path) -> bool:
    return any(path.name.endswith(suffix) for suffix in SHARD_SUFFIXES)


def _key(path: Path, base: Path) -> str:
    return path.relative_to(base).with_suffix("").as_posix()


def collect_inputs(paths: Sequence[str | os.PathLike], file_lists: Sequence[str | os.PathLike] = ()) -> Inputs:
    """Expand folders (recursively, image suffixes), file lists (one path a line) and shards, in order.

    Two inputs with the same key would write the same files: the later one is refused, named.
    """
    inputs = Inputs()
    candidates: list[FileItem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                inputs.refused.append((str(path), f"folder has no images ({', '.join(IMAGE_SUFFIXES)})"))
            candidates.extend(FileItem(_key(p, path), p) for p in found)
        elif _is_shard(path):
            inputs.shards.append(path)
        else:
            candidates.append(FileItem(path.stem, path))
    for file_list in file_lists:
        list_path = Path(file_list)
        if not list_path.is_file():
            raise FileNotFoundError(f"file list not found: {list_path}")
        listed = [Path(line.strip()) for line in list_path.read_text().splitlines() if line.strip()]
        if not listed:
            inputs.refused.append((str(list_path), "file list is empty"))
            continue
        base = Path(os.path.commonpath([p.parent.absolute() for p in listed]))
        candidates.extend(FileItem(_key(p.absolute(), base), p) for p in listed)
    owner: dict[str, str] = {}
    for item in candidates:
        if item.key in owner:
            inputs.refused.append((str(item.path), f"output name {item.key!r} is already taken by {owner[item.key]}"))
            continue
        owner[item.key] = str(item.path)
        inputs.files.append(item)
    return inputs


class Outputs:
    """Where each key's files go, whether they are all there, and how they are written."""

    #: Settings the label maps in a folder were made with; skipping is only safe under the same ones.
    MANIFEST = ".pacl-segment.json"

    def __init__(self, directory: str | os.PathLike, overlays: bool = True):
        self.directory = Path(directory)
        self.overlays = overlays

    def claim(self, settings: dict, *, overwrite: bool, write: bool) -> None:
        """Refuse to add to a folder made with other settings (its existing files would be skipped as done).

        ``write``: record the settings (one rank does; the others only check).
        """
        manifest = self.directory / self.MANIFEST
        settings = json.loads(json.dumps(settings))
        if manifest.is_file() and not overwrite:
            old = json.loads(manifest.read_text())
            if old != settings:
                changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.directory} holds label maps made with other settings (differs in: {', '.join(changed)}); "
                    "images already there would be skipped as done. Use another --out, or --overwrite"
                )
        if write:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = manifest.with_name(manifest.name + f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(settings, indent=1))
            os.replace(temporary, manifest)

    def paths(self, key: str) -> dict[str, Path]:
        paths = {"labels": self.directory / f"{key}_labels.png"}
        if self.overlays:
            paths["overlay"] = self.directory / f"{key}_overlay.png"
        return paths

    def done(self, key: str) -> bool:
        return all(p.is_file() for p in self.paths(key).values())

    def write(self, key: str, result: Segmentation) -> dict[str, Path]:
        paths = self.paths(key)
        paths["labels"].parent.mkdir(parents=True, exist_ok=True)
        images = {"labels": result.label_image()}
        if self.overlays:
            images = {"overlay": result.overlay(), **images}  # labels last: they mark the image done
        for name, image in images.items():
            temporary = paths[name].with_name(paths[name].name + f".{os.getpid()}.tmp")
            image.save(temporary, format="PNG")
            os.replace(temporary, paths[name])
        return paths


# (key, source, image [3, H, W] or None, error or None, already done)
Loaded = tuple[str, str, torch.Tensor | None, str | None, bool]


class _FileImages(Dataset):
    def __init__(self, items: Sequence[FileItem], max_pixels: int):
        self.items = list(items)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        item = self.items[index]
        try:
            return item.key, str(item.path), load_image(item.path, max_pixels=self.max_pixels), None, False
        except (FileNotFoundError, ValueError, TypeError) as error:
            return item.key, str(item.path), None, f"{type(error).__name__}: {error}", False


def iterate_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset samples of a tar shard: ``(key, {extension: bytes})``, members grouped by key."""
    key, fields = None, {}
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot or stem.startswith("."):
                continue
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:
                if key is not None:
                    yield key, fields
                key, fields = member_key, {}
            fields[extension.lower()] = archive.extractfile(member).read()
    if key is not None:
        yield key, fields


class _ShardImages(IterableDataset):
    """This rank's shards, split again across DataLoader workers; done samples are not decoded."""

    def __init__(self, shards: Sequence[Path], outputs: Outputs, max_pixels: int, overwrite: bool):
        self.shards = list(shards)
        self.outputs = outputs
        self.max_pixels = max_pixels
        self.overwrite = overwrite

    def __iter__(self) -> Iterator[Loaded]:
        worker = get_worker_info()
        shards = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for shard in shards:
            try:
                for key, fields in iterate_shard(shard):
                    source = f"{shard}:{key}"
                    if not self.overwrite and self.outputs.done(key):
                        yield key, source, None, None, True
                        continue
                    field_name = next((f for f in IMAGE_FIELDS if f in fields), None)
                    if field_name is None:
                        yield key, source, None, f"ValueError: sample has no image field ({sorted(fields)})", False
                        continue
                    try:
                        image = load_image(Image.open(io.BytesIO(fields[field_name])), max_pixels=self.max_pixels)
                        yield key, source, image, None, False
                    except (ValueError, TypeError, OSError) as error:
                        yield key, source, None, f"{type(error).__name__}: cannot decode {field_name}: {error}", False
            except (OSError, tarfile.TarError) as error:
                yield "", str(shard), None, f"{type(error).__name__}: cannot read shard: {error}", False


def _as_list(batch: list) -> list:
    return batch


@dataclass
class BulkSummary:
    """Counts over every rank; ``failures`` are ``(source, error)``."""

    written: int
    skipped: int
    failures: list[tuple[str, str]]

    @property
    def total(self) -> int:
        return self.written + self.skipped + len(self.failures)


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
    dist: DistInfo | None = None,
    workers: int = 0,
    progress: bool = True,
    on_result: Callable[[str, str, Segmentation], None] | None = None,
) -> BulkSummary:
    """Segment this rank's share of ``inputs`` into ``out_dir``; return the summary of all ranks.

    ``on_result(key, source, segmentation)`` is called after each image is written.
    """
    dist = dist or DistInfo()
    outputs = Outputs(out_dir, overlays)
    settings = {
        "model": segmenter.model_id,
        "image_size": segmenter.image_size,
        "labels": list(labels),
        "templates": templates if isinstance(templates, str) else list(templates),
        "background_threshold": background_threshold,
        "sliding_window": None if sliding_window is None else asdict(sliding_window),
    }
    outputs.claim(settings, overwrite=overwrite, write=dist.is_main)
    files = inputs.files[dist.rank :: dist.world_size]
    skipped = 0
    if not overwrite:
        todo = [item for item in files if not outputs.done(item.key)]
        skipped = len(files) - len(todo)
        files = todo
    shards = inputs.shards[dist.rank :: dist.world_size]
    refused = inputs.refused if dist.is_main else []
    failures: list[tuple[str, str]] = list(refused)
    written = 0
    segmenter.encode_labels(labels, templates)
    bar = tqdm(
        total=len(files) if not shards else None,
        disable=not (progress and dist.is_main),
        desc="segment" + (f" (rank 0 of {dist.world_size})" if dist.enabled else ""),
        unit="img",
        dynamic_ncols=True,
    )
    loaders = [
        DataLoader(
            _FileImages(files, segmenter.max_pixels),
            batch_size=segmenter.batch_size,
            num_workers=workers,
            collate_fn=_as_list,
        )
    ]
    if shards:
        loaders.append(
            DataLoader(
                _ShardImages(shards, outputs, segmenter.max_pixels, overwrite),
                batch_size=segmenter.batch_size,
                num_workers=min(workers, len(shards)),
                collate_fn=_as_list,
            )
        )
    for loader in loaders:
        for batch in loader:
            ready = []
            for key, source, image, error, done in batch:
                if done:
                    skipped += 1
                elif error is not None:
                    failures.append((source, error))
                else:
                    ready.append((key, source, image))
            if ready:
                results = segmenter.predict(
                    [image for _, _, image in ready],
                    labels,
                    templates=templates,
                    background_threshold=background_threshold,
                    sliding_window=sliding_window,
                    errors="return",
                    keep_images=overlays,
                )
                for (key, source, _), result in zip(ready, results):
                    if isinstance(result, ImageError):
                        failures.append((source, f"{type(result.error).__name__}: {result.error}"))
                        continue
                    try:
                        outputs.write(key, result)
                    except OSError as error:
                        failures.append((source, f"cannot write outputs: {error}"))
                        continue
                    written += 1
                    if on_result is not None:
                        on_result(key, source, result)
            bar.update(len(batch))
    bar.close()
    parts = gather_objects((written, skipped, failures))
    return BulkSummary(
        written=sum(p[0] for p in parts),
        skipped=sum(p[1] for p in parts),
        failures=[f for p in parts for f in p[2]],
    )
