"""The cached linear probe and the one cache mechanism it shares with latent diffusion (`mmpeft.core.cache`):
the frozen backbone runs once per input, training is identical to the uncached probe, methods that touch the
backbone are refused, random augmentation and a backbone in train mode turn it off with a warning."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from mmpeft.backbones import TimmViT
from mmpeft.core.cache import ContentCache, content_key, content_keys
from mmpeft.data import DigitsDataModule
from mmpeft.methods.baselines import LinearProbe
from mmpeft.tasks import ImageClassification

TRAIN_IMAGES, VAL_IMAGES = 270, 108  # digits downstream


def tiny_vit() -> TimmViT:
    """A ViT at the digits' 8x8 resolution, with drop-path (so a backbone left in train mode is random)."""
    return TimmViT("test_vit", img_size=8, patch_size=2, in_chans=1, drop_path_rate=0.1)


def fit(method="linear", feature_cache="auto", epochs=3, shift=0):
    """A probe on the digits' downstream task; returns the task, its trainer, the images the backbone ran on per
    (stage, epoch) and the warnings raised."""
    pl.seed_everything(0, verbose=False)
    task = ImageClassification(tiny_vit(), method=method, num_classes=10, lr=0.01, feature_cache=feature_cache)
    forwards: Counter = Counter()
    task.model.backbone.register_forward_hook(
        lambda _, __, out: forwards.update(
            {("train" if task.trainer.training else "val", task.current_epoch): len(out)}
        )
    )
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=DigitsDataModule(batch_size=32, shift=shift))
    return task, trainer, forwards, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def probes():
    """The same probe (same seed) with and without the feature cache."""
    return fit(feature_cache=True), fit(feature_cache=False)


def test_the_cached_probe_runs_the_backbone_only_in_the_first_epoch(probes):
    (task, _, forwards, _), (_, _, plain, _) = probes
    assert [forwards["train", e] for e in range(3)] == [TRAIN_IMAGES, 0, 0], "each image once, alone"
    assert [forwards["val", e] for e in range(3)] == [VAL_IMAGES, 0, 0]
    assert [plain["train", e] for e in range(3)] == [TRAIN_IMAGES] * 3, "without the cache: every epoch"
    assert len(task.feature_caches["train"]) == 270 and len(task.feature_caches["val"]) == 108
    assert task.feature_caches["train"].passes == task.feature_caches["val"].passes == 3, "one pass an epoch"


def test_the_cached_probe_trains_exactly_as_the_uncached_probe(probes):
    (cached, trainer, _, _), (plain, plain_trainer, _, _) = probes
    for name, tensor in plain.model.head.state_dict().items():
        assert torch.equal(cached.model.head.state_dict()[name], tensor), name
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == {
        k: float(v) for k, v in plain_trainer.callback_metrics.items()
    }
    # predictions of a validation batch from the cache equal the full model's
    images, _ = next(iter(trainer.datamodule.val_dataloader()))
    cached.eval()
    assert torch.equal(cached.model.head(cached.feature_caches.features(cached, cached.feature_caches["val"], images)),
                       cached.model(images))  # fmt: skip


def test_cached_features_give_the_same_loss_and_head_gradients():
    task = ImageClassification(tiny_vit(), method="linear", num_classes=10, feature_cache=True).train()
    cache = task.feature_caches["train"]
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))

    def loss_and_grads(output):
        task.model.head.zero_grad()
        loss = F.cross_entropy(output, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in task.model.head.parameters()]

    reference = loss_and_grads(task.model(images))
    for _ in range(2):  # computed and stored, then read from the cache
        loss, grads = loss_and_grads(task.model.head(task.feature_caches.features(task, cache, images)))
        assert torch.equal(loss, reference[0]) and all(map(torch.equal, grads, reference[1]))
    assert len(cache) == 6 and cache.hits == 6


@pytest.mark.parametrize("method", ["bitfit", "lora", "full"])
def test_methods_that_touch_the_backbone_are_refused(method):
    with pytest.raises(ValueError, match="only a pure linear probe"):
        ImageClassification(tiny_vit(), method=method, num_classes=10, feature_cache=True)
    assert ImageClassification(tiny_vit(), method=method, num_classes=10).feature_caches.caches == {}, "auto: off"


def test_auto_caches_the_linear_probe_only_and_false_turns_it_off():
    probe = ImageClassification(tiny_vit(), method="linear", num_classes=10)
    assert set(probe.feature_caches.caches) == {"train", "val"}
    off = ImageClassification(tiny_vit(), method="linear", num_classes=10, feature_cache=False)
    assert off.feature_caches.caches == {}
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        ImageClassification(tiny_vit(), num_classes=10, feature_cache="yes")


def test_random_augmentation_turns_the_training_cache_off_with_one_warning():
    task, _, forwards, caught = fit(shift=1)  # random one-pixel shifts: new training inputs every epoch
    assert sum("repeat an input of the first" in m for m in caught) == 1, caught
    assert not task.feature_caches["train"].enabled and len(task.feature_caches["train"]) == 0
    assert forwards["train", 0] == forwards["train", 2] == TRAIN_IMAGES
    assert TRAIN_IMAGES - 32 < forwards["train", 1] < TRAIN_IMAGES, "hits only until the check after 32 lookups"
    assert task.feature_caches["val"].enabled and forwards["val", 1] == forwards["val", 2] == 0, "val has no shift"


@dataclass
class TrainModeProbe(LinearProbe):
    """A probe whose frozen backbone follows train mode (drop-path on): its features are not cacheable."""

    frozen_mode: ClassVar[str] = "train"


def test_a_frozen_backbone_in_train_mode_is_not_cached():
    task, _, forwards, caught = fit(method=TrainModeProbe(), epochs=2)
    assert sum("train mode" in m and "feature cache off" in m for m in caught) == 1, caught
    assert [forwards["train", e] for e in range(2)] == [TRAIN_IMAGES] * 2
    assert not task.feature_caches["train"].enabled


def test_content_cache_keys_and_get_or_compute():
    x = torch.randn(4, 3)
    assert content_keys(x) == content_keys(x.clone()) and len(set(content_keys(x))) == 4
    assert content_key(torch.zeros(4)) != content_key(torch.zeros(2, 2)) != content_key(torch.zeros(4).double())
    assert content_key(torch.ones(2, dtype=torch.bfloat16)) == content_key(torch.ones(2, dtype=torch.bfloat16))
    assert content_key("a prompt") == "a prompt"

    calls = []

    def compute(batch):
        calls.append(len(batch))
        return batch * 2, batch + 1  # a tuple of values per sample, as the VAE's (mean, std)

    cache = ContentCache("test")
    first = cache.get_or_compute(x[:2], compute)
    mixed = cache.get_or_compute(x[1:], compute)  # x[1] cached: only x[2], x[3] computed
    assert calls == [1, 1, 1, 1] and len(cache) == 4, "each sample computed once, alone"
    assert torch.equal(mixed[0], x[1:] * 2) and torch.equal(mixed[1], x[1:] + 1) and torch.equal(first[0], x[:2] * 2)
    assert torch.equal(cache.get_or_compute(x, compute)[0], x * 2) and calls == [1] * 4, "all hits: no compute"


def test_a_cached_value_does_not_depend_on_the_batch_it_was_computed_in():
    """A resumed run fills its cache in another order than the uninterrupted run: with a computation whose
    rounding depends on the batch (here made explicit), the cached values must still be the same."""

    def batch_dependent(batch):
        return batch * 2 + 1e-3 * len(batch)

    x = torch.randn(6, 3)
    first, second = ContentCache("first"), ContentCache("second")
    for part in (x[:4], x[4:]):
        first.get_or_compute(part, batch_dependent)
    for part in (x[[5, 0]], x[[1, 2, 3, 4]]):
        second.get_or_compute(part, batch_dependent)
    assert torch.equal(first.get_or_compute(x, batch_dependent), second.get_or_compute(x, batch_dependent))


def test_content_cache_byte_budget_and_repeat_check():
    cache = ContentCache("test", max_bytes=3 * 3 * 4)  # three rows of three float32
    x = torch.randn(5, 3)
    with pytest.warns(UserWarning, match="cache is full"):
        out = cache.get_or_compute(x, lambda b: b * 2)
    assert len(cache) == 3 and cache.full and torch.equal(out, x * 2)
    assert torch.equal(cache.get_or_compute(x, lambda b: b * 2), x * 2), "beyond the budget: computed again"

    cache = ContentCache("test")
    cache.start_pass()
    cache.get_or_compute(x, lambda b: b)
    cache.start_pass()
    cache.get_or_compute(x, lambda b: b)
    assert cache.check_repeats(min_lookups=5) and cache.enabled, "the same inputs: kept"

    cache = ContentCache("test")
    for _ in range(2):
        cache.start_pass()
        cache.get_or_compute(torch.randn(5, 3), lambda b: b)
    with pytest.warns(UserWarning, match="transform is random"):
        assert not cache.check_repeats(min_lookups=5)
    assert len(cache) == 0 and torch.equal(cache.get_or_compute(x, lambda b: b + 1), x + 1)


def test_latent_diffusion_caches_the_vae_through_the_shared_class():
    from mmpeft.backbones import DiffusersDiT
    from mmpeft.tasks import LatentDiffusion

    task = LatentDiffusion(DiffusersDiT(source="tiny_dit", tie_embeddings=False), method="bitfit", pipeline="tiny_sd")
    assert isinstance(task._latent_cache, ContentCache) and isinstance(task._text_cache, ContentCache)
    calls = []
    encode = task.vae.encode
    task.vae.encode = lambda x: calls.append(len(x)) or encode(x)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    first = task._latent_distribution(images[:2])
    again = task._latent_distribution(images[:2])
    mixed = task._latent_distribution(images[1:])
    assert calls == [1, 1, 1], "each image is encoded once, alone"
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and torch.equal(mixed[0][0], first[0][1])
    task.cache = False
    assert torch.allclose(task._latent_distribution(images[1:])[0], mixed[0], atol=1e-6) and calls == [1, 1, 1, 2]
