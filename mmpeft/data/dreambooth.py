"""DreamBooth-style personalization data: a folder of a few subject photos and an instance prompt, no list file.

    instance_dir/            dog1.jpg dog2.png ...   (3-5 photos of the subject)
    class_dir/               prior images of the class (generated once by the frozen model when missing)

A class-conditional DiT is personalized the same way with labels in place of prompts: the subject becomes a new
class (`instance_class`, a row the backbone adds with `add_classes`), and prior preservation keeps the pretrained
classes (`prior_classes`), whose images live in `class_dir/<label>/`.

Training images are resized on the short side and cropped (centre or random) to `image_size`, optionally
flipped, as diffusers' DreamBooth scripts do, and scaled to [-1, 1]. With prior preservation (`class_dir` and
`class_prompt`), each batch holds `batch_size` instance images and as many class images, concatenated so one
denoiser forward serves both halves; the third batch element marks the class half (the task weighs it by
`prior_loss_weight`). Missing class images are made before training by the task
(`generate_prior_images`: the frozen model through `disabled()`, no second copy of the weights), written with
a `provenance.json` naming the model, prompt and seeds, and reused by later runs that match it.
Validation is the instance images, centre-cropped, with the task's fixed evaluation noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmpeft.data.checks import DataError
from mmpeft.data.image_list import open_image
from mmpeft.data.sampling import split_loader
from mmpeft.data.transforms import diffusion_transform

__all__ = ["DreamBoothDataModule", "IMAGE_SUFFIXES", "image_files", "PROVENANCE"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PROVENANCE = "provenance.json"


def image_files(folder: Path) -> list[Path]:
    """The images directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


Conditioning = str | int  # a prompt (a text-conditioned UNet) or a class label (a class-conditional DiT)


class _Personalization(Dataset):
    """Item i: (instance image i mod N, its conditioning[, class image i mod M, its conditioning])."""

    def __init__(self, instances: list[Path], cond: Conditioning, transform,
                 prior: list[tuple[Path, Conditioning]] | None, length: int, channels: str):  # fmt: skip
        self.instances, self.cond, self.transform = instances, cond, transform
        self.prior, self.length, self.channels = prior, length, channels

    def __len__(self) -> int:
        return self.length

    def _load(self, path: Path) -> torch.Tensor:
        return self.transform(open_image(path, self.channels, fix="fix or remove it from the folder"))

    def __getitem__(self, i: int) -> tuple:
        item = (self._load(self.instances[i % len(self.instances)]), self.cond)
        if self.prior is None:
            return item
        path, cond = self.prior[i % len(self.prior)]
        return (*item, self._load(path), cond)


def collate_with_prior(items: list[tuple]) -> tuple[torch.Tensor, list[str] | torch.Tensor, torch.Tensor]:
    """(instance images + class images, their prompts or labels, a mask of the class half): one forward for both."""
    instances = [it[0] for it in items] + [it[2] for it in items if len(it) > 2]
    conds = [it[1] for it in items] + [it[3] for it in items if len(it) > 2]
    prior = torch.tensor([False] * len(items) + [True] * (len(instances) - len(items)))
    labels = all(isinstance(c, int) for c in conds)
    return torch.stack(instances), torch.tensor(conds) if labels else conds, prior


class DreamBoothDataModule(pl.LightningDataModule):
    """Personalization on a folder of subject photos (see the module docstring).

    Args:
        instance_dir: the subject's photos (3-5 as in DreamBooth).
        instance_prompt: e.g. "a photo of sks dog" (a rare token for the subject); a text-conditioned UNet.
        instance_class: the subject's label instead, for a class-conditional DiT (a new row: `add_classes`).
        class_dir / class_prompt: prior preservation ("a photo of dog"); both or neither.
        prior_classes: the labels whose generated images keep the prior for a DiT (with `class_dir`, in place of
            `class_prompt`): image k is of label prior_classes[k mod len], in `class_dir/<label>/`.
        num_class_images: class images to keep in `class_dir` (diffusers' default 100).
        image_size: training resolution (SD 1.x: 512; the tiny SD: 64).
        center_crop: centre crop after the short-side resize (else a random crop); random_flip: flip half the time.
        repeats: how many times the instance photos are seen per epoch (without prior preservation).
        class_steps / class_guidance_scale: the sampler settings of generated class images.
        channels: 3 (RGB) or 1 (grayscale, a one-channel pixel model such as `digits_dit`).
    """

    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str | None = None,
        class_dir: str | None = None,
        class_prompt: str | None = None,
        num_class_images: int = 100,
        image_size: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
        class_steps: int = 25,
        class_guidance_scale: float = 7.5,
        instance_class: int | None = None,
        prior_classes: list[int] | None = None,
        channels: int = 3,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.instance_dir = Path(instance_dir)
        if not self.instance_dir.is_dir():
            raise DataError(f"instance_dir {str(self.instance_dir)!r} is not a folder; give the subject photos' folder")
        self.instances = image_files(self.instance_dir)
        if not self.instances:
            raise DataError(
                f"instance_dir {str(self.instance_dir)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the "
                "subject's photos directly in it"
            )
        if (instance_prompt is None) == (instance_class is None):
            raise ValueError("give instance_prompt (a text-conditioned UNet) or instance_class (a class-conditional "
                             "DiT), one of them")  # fmt: skip
        self.labelled = instance_class is not None
        prior_cond = prior_classes if self.labelled else class_prompt
        wrong = class_prompt if self.labelled else prior_classes
        if wrong is not None:
            raise ValueError("a class-conditional run keeps its prior with prior_classes, a text one with "
                             "class_prompt; this run gives the other")  # fmt: skip
        if (class_dir is None) != (prior_cond is None) or prior_cond == []:
            what = "prior_classes" if self.labelled else "class_prompt"
            raise ValueError(f"prior preservation needs both class_dir and {what} (or neither)")
        if num_class_images < 1 or repeats < 1:
            raise ValueError("num_class_images and repeats must be at least 1")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 3 (RGB) or 1 (grayscale), got {channels}")
        self.class_dir = Path(class_dir) if class_dir else None
        # a prompt-conditioned task has no class count; labels are checked against the DiT's class table
        self.num_classes = 1 + max([instance_class, *(prior_classes or [])]) if self.labelled else None

    @property
    def instance_cond(self) -> Conditioning:
        return self.hparams.instance_class if self.labelled else self.hparams.instance_prompt

    def sample_prompts(self) -> list[str]:
        """What validation grids sample by default: the instance prompt."""
        return [] if self.labelled else [self.hparams.instance_prompt]

    def sample_class_ids(self) -> list[int]:
        """A class-conditional run's validation grids: the new class."""
        return [self.hparams.instance_class] if self.labelled else []

    @property
    def channel_mode(self) -> str:
        return "L" if self.hparams.channels == 1 else "RGB"

    @property
    def prior_preservation(self) -> bool:
        return self.class_dir is not None

    def _class_images(self) -> list[tuple[Path, Conditioning]]:
        """Every class image present with its conditioning: `class_dir/*` (the class prompt) or
        `class_dir/<label>/*` for each prior class."""
        if not self.class_dir.is_dir():
            return []
        if not self.labelled:
            return [(path, self.hparams.class_prompt) for path in image_files(self.class_dir)]
        folders = [(self.class_dir / str(label), label) for label in self.hparams.prior_classes]
        return [(path, label) for folder, label in folders if folder.is_dir() for path in image_files(folder)]

    def class_files(self) -> list[tuple[Path, Conditioning]]:
        """The class images training uses, with their prompt or label (`num_class_images` of them)."""
        return self._class_images()[: self.hparams.num_class_images]

    def prior_targets(self, seeds: list[int]) -> list[tuple[int, Conditioning, Path]]:
        """(seed, prompt or label, file) of each class image to make: `class-<seed>.png`, under its label's folder
        for a class-conditional run (image k of label prior_classes[k mod len])."""
        hp = self.hparams
        if not self.labelled:
            return [(s, hp.class_prompt, self.class_dir / f"class-{s:05d}.png") for s in seeds]
        labels = hp.prior_classes
        return [(s, labels[s % len(labels)], self.class_dir / str(labels[s % len(labels)]) / f"class-{s:05d}.png")
                for s in seeds]  # fmt: skip

    def prior_provenance(self, model_fingerprint: str) -> dict[str, Any]:
        """What the class images were made with: the frozen model, prompt or labels, size and sampler settings."""
        hp = self.hparams
        prior = {"prior_classes": list(hp.prior_classes)} if self.labelled else {"class_prompt": hp.class_prompt}
        return {"model": model_fingerprint, **prior, "image_size": hp.image_size, "steps": hp.class_steps,
                "guidance_scale": hp.class_guidance_scale}  # fmt: skip

    def missing_class_images(self, model_fingerprint: str) -> list[int]:
        """The seeds of the class images still to make. Images written by another model or prompt are not reused:
        their folder is refused (a different prior would silently change the run)."""
        if not self.prior_preservation:
            return []
        wanted = self.prior_provenance(model_fingerprint)
        record = self.class_dir / PROVENANCE
        have = self._class_images()
        if have:
            if not record.is_file():
                return []  # the user's own class photos: used as they are
            made = json.loads(record.read_text())
            if {k: made.get(k) for k in wanted} != wanted:
                raise DataError(
                    f"class_dir {str(self.class_dir)!r} holds class images made with other settings "
                    f"({PROVENANCE}: {json.dumps({k: made.get(k) for k in wanted})}; this run: {json.dumps(wanted)}); "
                    "give another class_dir, or delete the folder to make them again"
                )
        return list(range(len(have), self.hparams.num_class_images))

    def setup(self, stage: str) -> None:
        """Before training: the task makes the missing class images (`generate_prior_images`), once."""
        if stage != "fit" or not self.prior_preservation:
            return
        task = self.trainer.lightning_module if self.trainer is not None else None
        make = getattr(task, "generate_prior_images", None)
        if make is None:
            if len(self.class_files()) < self.hparams.num_class_images:
                raise DataError(
                    f"class_dir {str(self.class_dir)!r} has {len(self.class_files())} of num_class_images = "
                    f"{self.hparams.num_class_images} images, and the task cannot generate them"
                )
            return
        if self.trainer.is_global_zero:  # one process writes the class images; the others wait for them
            make(self)
        self.trainer.strategy.barrier("dreambooth class images")

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        transform = diffusion_transform(hp.image_size, hp.center_crop, hp.random_flip)
        prior = None
        length = len(self.instances) * hp.repeats
        if self.prior_preservation:
            prior = self.class_files()
            if not prior:
                raise DataError(f"class_dir {str(self.class_dir)!r} holds no class images (were they generated?)")
            length = max(len(prior), len(self.instances))
        data = _Personalization(self.instances, self.instance_cond, transform, prior, length, self.channel_mode)
        return split_loader(data, hp.batch_size, shuffle=True, num_workers=hp.num_workers,
                            collate_fn=collate_with_prior)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        transform = diffusion_transform(hp.image_size, True, False)
        data = _Personalization(self.instances, self.instance_cond, transform, None, len(self.instances),
                                self.channel_mode)  # fmt: skip
        return split_loader(data, hp.batch_size, shuffle=False, num_workers=hp.num_workers,
                            collate_fn=collate_with_prior)  # fmt: skip
