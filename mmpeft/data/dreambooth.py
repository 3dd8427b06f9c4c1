"""DreamBooth-style personalization data: a folder of a few subject photos and an instance prompt, no list file.

    instance_dir/            dog1.jpg dog2.png ...   (3-5 photos of the subject)
    class_dir/               prior images of the class (generated once by the frozen model when missing)

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


class _Personalization(Dataset):
    """Item i: (instance image i mod N, instance prompt[, class image i mod M, class prompt])."""

    def __init__(self, instances: list[Path], prompt: str, transform, prior: tuple[list[Path], str] | None,
                 length: int):  # fmt: skip
        self.instances, self.prompt, self.transform = instances, prompt, transform
        self.prior, self.length = prior, length

    def __len__(self) -> int:
        return self.length

    def _load(self, path: Path) -> torch.Tensor:
        return self.transform(open_image(path, fix="fix or remove it from the folder"))

    def __getitem__(self, i: int) -> tuple:
        item = (self._load(self.instances[i % len(self.instances)]), self.prompt)
        if self.prior is None:
            return item
        files, class_prompt = self.prior
        return (*item, self._load(files[i % len(files)]), class_prompt)


def collate_with_prior(items: list[tuple]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(instance images + class images, their prompts, a mask of the class half): one forward for both."""
    instances = [it[0] for it in items] + [it[2] for it in items if len(it) > 2]
    prompts = [it[1] for it in items] + [it[3] for it in items if len(it) > 2]
    prior = torch.tensor([False] * len(items) + [True] * (len(instances) - len(items)))
    return torch.stack(instances), prompts, prior


class DreamBoothDataModule(pl.LightningDataModule):
    """Personalization on a folder of subject photos (see the module docstring).

    Args:
        instance_dir: the subject's photos (3-5 as in DreamBooth).
        instance_prompt: e.g. "a photo of sks dog" (a rare token for the subject).
        class_dir / class_prompt: prior preservation ("a photo of dog"); both or neither.
        num_class_images: class images to keep in `class_dir` (diffusers' default 100).
        image_size: training resolution (SD 1.x: 512; the tiny SD: 64).
        center_crop: centre crop after the short-side resize (else a random crop); random_flip: flip half the time.
        repeats: how many times the instance photos are seen per epoch (without prior preservation).
        class_steps / class_guidance_scale: the sampler settings of generated class images.
    """

    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str,
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
        if (class_dir is None) != (class_prompt is None):
            raise ValueError("prior preservation needs both class_dir and class_prompt (or neither)")
        if num_class_images < 1 or repeats < 1:
            raise ValueError("num_class_images and repeats must be at least 1")
        self.class_dir = Path(class_dir) if class_dir else None
        self.num_classes = None  # a prompt-conditioned task: no head

    def sample_prompts(self) -> list[str]:
        """What validation grids sample by default: the instance prompt."""
        return [self.hparams.instance_prompt]

    @property
    def prior_preservation(self) -> bool:
        return self.class_dir is not None

    def class_files(self) -> list[Path]:
        return image_files(self.class_dir)[: self.hparams.num_class_images] if self.class_dir.is_dir() else []

    def prior_provenance(self, model_fingerprint: str) -> dict[str, Any]:
        """What the class images were made with: the frozen model, prompt, size and sampler settings."""
        hp = self.hparams
        return {"model": model_fingerprint, "class_prompt": hp.class_prompt, "image_size": hp.image_size,
                "steps": hp.class_steps, "guidance_scale": hp.class_guidance_scale}  # fmt: skip

    def missing_class_images(self, model_fingerprint: str) -> list[int]:
        """The seeds of the class images still to make. Images written by another model or prompt are not reused:
        their folder is refused (a different prior would silently change the run)."""
        if not self.prior_preservation:
            return []
        wanted = self.prior_provenance(model_fingerprint)
        record = self.class_dir / PROVENANCE
        have = image_files(self.class_dir) if self.class_dir.is_dir() else []
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
            files = self.class_files()
            if not files:
                raise DataError(f"class_dir {str(self.class_dir)!r} holds no class images (were they generated?)")
            prior, length = (files, hp.class_prompt), max(len(files), len(self.instances))
        data = _Personalization(self.instances, hp.instance_prompt, transform, prior, length)
        return split_loader(data, hp.batch_size, shuffle=True, num_workers=hp.num_workers,
                            collate_fn=collate_with_prior)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        transform = diffusion_transform(hp.image_size, True, False)
        data = _Personalization(self.instances, hp.instance_prompt, transform, None, len(self.instances))
        return split_loader(data, hp.batch_size, shuffle=False, num_workers=hp.num_workers,
                            collate_fn=collate_with_prior)  # fmt: skip
