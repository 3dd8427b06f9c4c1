"""VTAB-1k in its common folder format (NOAH / V-PETL), all 19 tasks, both protocols.

    <root>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt
    <root>/<task>/images/{train800,val200,train800val200,test}/000000.jpg ...

Protocols: "tune" trains on train800 and validates on val200 (hyper-parameter selection; no test
split); "final" trains on train800val200 and tests once on test (val200 is then a subset of the
training data and is reported only for monitoring). Preprocessing is explicit and logged with the
config: direct resize to a square, interpolation, mean/std (defaults: SSF's 224 bicubic 0.5/0.5,
the in21k checkpoints' own normalisation; VPT used bilinear + ImageNet statistics,
KMnP/vpt src/data/datasets/tf_dataset.py).
"""

from __future__ import annotations

from mmpeft.core.errors import UnknownName
from mmpeft.data.checks import Problems
from mmpeft.data.image_list import ImageListDataModule
from mmpeft.data.metadata import load_metadata

__all__ = ["VTAB1kDataModule", "vtab_tasks", "PROTOCOLS"]

LAYOUT = __doc__.split("\n\n")[1]

PROTOCOLS = {
    "tune": {"train_list": "train800.txt", "val_list": "val200.txt", "test_list": None},
    "final": {"train_list": "train800val200.txt", "val_list": "val200.txt", "test_list": "test.txt"},
}


def vtab_tasks() -> dict[str, dict]:
    return load_metadata("vtab1k")["tasks"]


class VTAB1kDataModule(ImageListDataModule):
    """One VTAB-1k task. `num_classes` comes from `mmpeft/datasets/vtab1k.yaml` (train800 may miss classes).

    The split files must have VTAB-1k's sizes (800 / 200 / 1000 lines). `verify=True` decodes every image
    of the splits in use before training (see `ImageListDataModule`).
    """

    layout = LAYOUT
    page = "vtab1k.md"

    def __init__(
        self,
        root: str,
        task: str = "cifar",
        protocol: str = "tune",
        image_size: int = 224,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        interpolation: str = "bicubic",
        batch_size: int = 64,
        num_workers: int = 4,
        shots: int | None = None,
        shot_seed: int = 1,
        train_crop: str = "resize",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        verify: bool = False,
    ):
        tasks = vtab_tasks()
        if task not in tasks:
            raise UnknownName(f"unknown VTAB-1k task {task!r}; tasks: {', '.join(tasks)}")
        if protocol not in PROTOCOLS:
            raise UnknownName(f"unknown VTAB-1k protocol {protocol!r}; use 'tune' (train800 -> val200) or 'final'")
        self.task, self.protocol, self.meta = task, protocol, tasks[task]
        super().__init__(
            f"{root.rstrip('/')}/{self.meta['folder']}", num_classes=self.meta["classes"], image_size=image_size,
            mean=mean, std=std, interpolation=interpolation, batch_size=batch_size, num_workers=num_workers,
            shots=shots, shot_seed=shot_seed, train_crop=train_crop, crop_scale=crop_scale, verify=verify,
            **PROTOCOLS[protocol],
        )  # fmt: skip

    def new_problems(self) -> Problems:
        return Problems(f"VTAB-1k {self.task} ({self.protocol} protocol) at {self.root}")

    def _check_lists(self, problems: Problems, lines: dict[str, int]) -> None:
        """The base checks, and each split file holds VTAB-1k's number of lines (before any k-shot cut)."""
        super()._check_lists(problems, lines)
        expected = load_metadata("vtab1k")["splits"]
        for split, name in self.lists.items():
            stem = name.removesuffix(".txt")
            if lines[split] and stem in expected and lines[split] != expected[stem]:  # an empty one is named already
                problems.add(
                    "split files of the wrong size", name,
                    f"has {lines[split]} lines, VTAB-1k's {stem} has {expected[stem]}: an incomplete download or "
                    "another dataset?",
                )  # fmt: skip

    @property
    def group(self) -> str:
        return self.meta["group"]

    def test_dataloader(self):
        if "test" not in self.items:
            raise ValueError("the 'tune' protocol has no test split (selection uses val200); use protocol='final'")
        return super().test_dataloader()
