"""ImageFolder for zero-shot classification: ``ROOT/CLASS/.../IMAGE`` (torchvision's layout).

Classes are the sub-folders of ``ROOT`` in sorted order (ImageNet's ``n01440764`` wnids, or
readable names); images are every file with an image suffix below a class folder, sorted. The
names the model is asked with are the folder names with ``_`` read as a space, unless a
class-names file gives them (one line per class folder, in sorted order; see ``names``).
"""

from __future__ import annotations

import os
from pathlib import Path

from pacl_fast.data.names import read_class_names
from pacl_fast.images import IMAGE_SUFFIXES


class ImageFolder:
    """``(image path, class index)`` samples of a class-per-folder tree."""

    def __init__(self, root: str | os.PathLike, class_names_file: str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; expected ROOT/CLASS/IMAGE files")
        self.folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.folders:
            raise FileNotFoundError(f"image folder {self.root} has no class sub-folders; expected ROOT/CLASS/IMAGE")
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for index, folder in enumerate(self.folders):
            files = sorted(
                p for p in (self.root / folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                empty.append(folder)
            self.samples.extend((path, index) for path in files)
        if empty:
            raise FileNotFoundError(
                f"image folder {self.root}: class folders without images ({', '.join(empty[:5])}"
                f"{'...' if len(empty) > 5 else ''}); expected files ending in {', '.join(IMAGE_SUFFIXES)}"
            )
        if class_names_file is None:
            self.names: tuple[tuple[str, ...], ...] = tuple((f.replace("_", " "),) for f in self.folders)
        else:
            self.names = read_class_names(class_names_file)
            if len(self.names) != len(self.folders):
                raise ValueError(
                    f"class-names file {class_names_file} has {len(self.names)} classes but {self.root} has "
                    f"{len(self.folders)} class folders; give one line per folder, in sorted folder order"
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        return self.samples[index]

    def sample_id(self, index: int) -> str:
        return str(self.samples[index][0].relative_to(self.root))
