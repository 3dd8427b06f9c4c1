"""Data checks that run before training: every problem is collected and reported in one `DataError`.

The image-list, VTAB-1k and FGVC datamodules check their split files when they are built (each line
parses, no used split is empty, every label is in range) and every listed image before the first step
(`setup`, which Lightning calls before fit / validate / test): the file exists and its header opens as an
image. `verify=True` decodes every image fully instead, which also finds truncated files. An image that
still fails to decode mid-epoch raises a `DataError` naming its path (`ImageList.__getitem__`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmpeft.core.errors import MmpeftError

__all__ = [
    "DataError", "Problems", "CheckedImages", "check_images", "image_problem", "layout_hint", "MAX_LISTED",
    "NON_FINITE",
]  # fmt: skip

MAX_LISTED = 20  # entries named in one error; the rest are counted
VERIFY_HINT = "run with `verify: true` (--data.init_args.verify true) to decode every image before training"

MISSING, NOT_IMAGE, UNREADABLE = "missing images", "files that are not images", "unreadable images"
NON_FINITE = "samples with NaN or inf values"
IMAGE_KINDS = (MISSING, NOT_IMAGE, UNREADABLE)


class DataError(MmpeftError, ValueError):
    """The dataset on disk is malformed: split files, labels or images (each bad entry is named)."""


@dataclass
class Problems:
    """Problems found in a dataset, grouped by kind; an entry (kind, where) is recorded once."""

    subject: str  # what was checked, e.g. "VTAB1kDataModule at /data/vtab-1k/dtd"
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, where, detail)
    _seen: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def add(self, kind: str, where: str, detail: str = "") -> None:
        if (kind, where) not in self._seen:
            self._seen.add((kind, where))
            self.entries.append((kind, where, detail))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def message(self, hint: str = "") -> str:
        counts = Counter(kind for kind, _, _ in self.entries)
        n = len(self.entries)
        summary = ", ".join(f"{kind}: {count}" for kind, count in counts.items())
        lines = [f"{self.subject}: {n} problem{'s' if n != 1 else ''} in the data, found before training ({summary})"]
        lines += [f"  {where}: {detail}" if detail else f"  {where}" for _, where, detail in self.entries[:MAX_LISTED]]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more")
        return "\n".join(lines + ([hint] if hint else []))

    def raise_if_any(self, hint: str = "") -> None:
        if self:
            raise DataError(self.message(hint))


def image_problem(path: Path, full: bool = False) -> tuple[str, str] | None:
    """(kind, detail) if `path` is not a readable image, else None.

    `Image.open` reads only the header, so a file cut short after its header passes unless `full`
    decodes the pixels too (`img.load()`).
    """
    try:
        with Image.open(path) as image:
            if full:
                image.load()
    except (FileNotFoundError, NotADirectoryError):
        return MISSING, "no such file"
    except UnidentifiedImageError:
        return NOT_IMAGE, "PIL cannot identify an image format in it"
    except IsADirectoryError:
        return NOT_IMAGE, "a directory"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return UNREADABLE, f"{type(err).__name__}: {err}"
    return None


def check_images(
    problems: Problems,
    root: Path,
    entries: Iterable[tuple[str, str]],
    full: bool = False,
    progress: bool = True,
) -> None:
    """Add a problem for every listed image under `root` that is missing or does not open.

    `entries` are (relative path, where it is listed, e.g. "train.txt:12"); a path listed in several
    splits is opened and reported once. `full` decodes every image (threads, with a progress bar).
    """
    if not root.is_dir():
        problems.add(MISSING, str(root), "the image folder does not exist, so no listed image can be read")
        return
    listed: dict[str, str] = {}
    for rel, where in entries:
        listed.setdefault(rel, where)
    paths = list(listed)
    if full:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            found = pool.map(lambda rel: image_problem(root / rel, full=True), paths)
            found = list(tqdm(found, total=len(paths), desc="verifying images", unit="img", disable=not progress))
    else:
        found = [image_problem(root / rel) for rel in paths]
    for rel, problem in zip(paths, found):
        if problem is not None:
            kind, detail = problem
            problems.add(kind, f"{root / rel} ({listed[rel]})", detail)


def layout_hint(layout: str, page: str) -> str:
    """The expected layout and the dataset's page in the repository's `datasets/` folder, which says where to get
    the data and how to prepare it (a user with a missing or misplaced dataset needs both)."""
    return f"Expected layout:\n{layout}\nWhere to get it and how to prepare it: see datasets/{page}"


def hint(layout: str, page: str, problems: Problems, verify: bool) -> str:
    """The expected layout and page, and how to find truncated images too when only headers were read."""
    text = layout_hint(layout, page)
    if not verify and any(kind in IMAGE_KINDS for kind, _, _ in problems.entries):
        text += f"\nImages were opened by their headers only; {VERIFY_HINT}."
    return text


class CheckedImages:
    """Mixin for datamodules built from split files: `setup` checks every listed image once, before training.

    Lightning calls `setup` before fit / validate / test / predict, so a missing or unreadable image stops
    the run before its first step. A datamodule supplies `image_entries` (the image folder and
    (relative path, where listed) of every image a split in use lists), `new_problems` (an empty `Problems`
    naming it), `layout`, `page` (its file in `datasets/`) and `hparams.verify`.
    """

    layout: str = ""
    page: str = "README.md"
    _images_checked: bool = False

    def image_entries(self) -> tuple[Path, list[tuple[str, str]]]:
        raise NotImplementedError

    def new_problems(self) -> Problems:
        return Problems(type(self).__name__)

    def raise_problems(self, problems: Problems) -> None:
        problems.raise_if_any(hint(self.layout, self.page, problems, self.hparams.verify))

    def add_image_problems(self, problems: Problems) -> None:
        """Add every listed image (of the splits in use) that is missing or does not open to `problems`."""
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        root, entries = self.image_entries()
        check_images(problems, root, entries, self.hparams.verify, progress=getattr(rank_zero_only, "rank", 0) == 0)

    def raise_with_images(self, problems: Problems) -> None:
        """At construction: split-file problems are reported with every bad image, so one error names all."""
        if problems:
            self.add_image_problems(problems)
            self.raise_problems(problems)

    def setup(self, stage: str | None = None) -> None:
        if not self._images_checked:
            problems = self.new_problems()
            self.add_image_problems(problems)
            self.raise_problems(problems)
            self._images_checked = True
