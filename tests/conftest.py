"""Shared fixtures: tiny backbones (the conformance suite's matrix) and an isolated, offline, quiet environment.

The suite must pass whatever the user's shell holds (`WANDB_MODE=offline` as the README suggests, a W&B key,
`MMPEFT_CACHE`, another `HOME`, a thread count) and under load. So before any test module is imported the
environment is replaced by the suite's own: every `WANDB_*`, `MMPEFT_*` and Lightning variable of the shell is
dropped, W&B is disabled (tests that use it turn it on themselves) with generous timeouts for a loaded machine,
and `HOME`, the caches and W&B's folders point into a fresh temporary folder. Each test then starts from that
environment and thread count again, whatever the test before it set (`seed_everything` exports PL_GLOBAL_SEED).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# pytest-xdist's workers (`-n 2` in pyproject's addopts) share the cores: one torch thread each, and OpenMP threads
# that sleep instead of spinning when a pretraining's fixed two threads meet the other worker (spinning threads on
# an oversubscribed CPU made such steps 3-10x slower). Read by OpenMP when torch loads, so set before the import.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

_SHELL_PREFIXES = ("WANDB_", "MMPEFT_", "PL_", "LIGHTNING_")


def _isolated_environment() -> None:
    for key in [k for k in os.environ if k.startswith(_SHELL_PREFIXES)]:
        del os.environ[key]
    home = Path(tempfile.mkdtemp(prefix="mmpeft-tests-home-"))
    # the quickstart backbones' pretraining cache: one per test run, shared by its workers (a lock makes the first
    # that needs a backbone pretrain it and the others wait for the file)
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    cache = Path(tempfile.gettempdir()) / f"mmpeft-tests-cache-{run}" if run else home / ".cache" / "mmpeft"
    os.environ.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        MMPEFT_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        WANDB_DIR=str(home / "wandb"),
        WANDB_CONFIG_DIR=str(home / "wandb-config"),
        WANDB_CACHE_DIR=str(home / "wandb-cache"),
        WANDB_DATA_DIR=str(home / "wandb-data"),
        WANDB_INIT_TIMEOUT="600",  # W&B's service starts slowly on a loaded machine (90 s by default)
        WANDB__SERVICE_WAIT="600",
    )


_isolated_environment()
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))
if _WORKERS > 1:  # the command-line runs the tests start share them too
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
_SUITE_ENVIRONMENT = dict(os.environ)
_SUITE_THREADS = torch.get_num_threads()


def _restore_suite_environment() -> None:
    for key in [k for k in os.environ if k not in _SUITE_ENVIRONMENT and not k.startswith("PYTEST_")]:
        del os.environ[key]  # pytest's own PYTEST_CURRENT_TEST stays
    os.environ.update(_SUITE_ENVIRONMENT)
    torch.set_num_threads(_SUITE_THREADS)


# the modules that take minutes on one of 2 cores (their fixtures' pretraining and fits, their command-line runs),
# with rough seconds: handed out first, spread over the workers, so the run does not end on one of them alone
_LONG_MODULES = {"test_quickstart.py": 420, "test_efficientdm.py": 170, "test_sweep_launch.py": 150,
                 "test_sweep.py": 130, "test_diffusion_quickstart.py": 110, "test_tasks.py": 60,
                 "test_bench_and_packaging.py": 45, "test_hardening.py": 30, "test_resume.py": 30}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the test files for pytest-xdist's `--dist loadfile`, which first hands each worker the next
    max(files // 4 // workers, 2) files in order, then one file at a time to whichever is free: the long modules
    go into those first hands, longest first to the least loaded, the rest keep their order."""
    if _WORKERS < 2:
        return
    files = list(dict.fromkeys(item.path for item in items))
    batch = max(len(files) // 4 // _WORKERS, 2)
    hands: list[list[Path]] = [[] for _ in range(_WORKERS)]
    load = [0.0] * _WORKERS
    for path in sorted((f for f in files if f.name in _LONG_MODULES), key=lambda f: -_LONG_MODULES[f.name]):
        free = [k for k in range(_WORKERS) if len(hands[k]) < batch]
        if not free:
            break
        k = min(free, key=load.__getitem__)
        hands[k].append(path)
        load[k] += _LONG_MODULES[path.name]
    placed = {path for hand in hands for path in hand}
    rest = [f for f in files if f not in placed]
    for hand in hands:
        while len(hand) < batch and rest:
            hand.append(rest.pop(0))
    order = {path: i for i, path in enumerate([path for hand in hands for path in hand] + rest)}
    items.sort(key=lambda item: order[item.path])


@pytest.fixture(autouse=True)
def _suite_environment() -> Iterator[None]:
    """Every test starts from the suite's environment and thread count, and leaves them so."""
    _restore_suite_environment()
    yield
    _restore_suite_environment()


@dataclass(frozen=True)
class BackboneCase:
    """A tiny backbone and a variant of another shape (for adapter-mismatch checks). The backbone
    itself brings its example inputs and loss (`example_batch`, `example_loss`)."""

    name: str
    build: Callable[[], nn.Module]
    build_other: Callable[[], nn.Module]


def tiny_unet(**overrides) -> nn.Module:
    """The shipped `tiny_sd_unet` (diffusers' (32, 64) test UNet) on 8x8 latents and 4 text tokens."""
    from mmpeft.backbones import TINY_SD_UNET, DiffusersUNet

    return DiffusersUNet(config={**TINY_SD_UNET, **overrides}, name="tiny_sd_unet", example_size=8, example_tokens=4)


def tiny_dit(**overrides) -> nn.Module:
    from mmpeft.backbones import TINY_DIT, DiffusersDiT

    return DiffusersDiT(config={**TINY_DIT, **overrides}, name="tiny_dit", example_size=8)


def tiny_point(**overrides) -> nn.Module:
    """Point-MAE's layout at toy size: 64 points, 8 groups of 8, 2 blocks of 32."""
    from mmpeft.backbones import PointTransformer

    config = dict(num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=32,
                  pointnet_widths=(16, 32, 64), drop_path_rate=0.1)  # fmt: skip
    return PointTransformer("point_mae", **{**config, **overrides})


def backbone_cases() -> list[BackboneCase]:
    from mmpeft.backbones import TimmModel, TimmViT
    from mmpeft.backbones.clip import ClipImageTower, ClipTextTower
    from tests.toys import ToyPointTower, ToyRegViT, ToyTextTower

    return [
        BackboneCase(
            "timm_vit",
            lambda: TimmViT("test_vit", img_size=32, drop_path_rate=0.1),
            lambda: TimmViT("test_vit", img_size=32, depth=2),
        ),
        BackboneCase("toy_text", ToyTextTower, lambda: ToyTextTower(depth=3)),
        BackboneCase("toy_point", ToyPointTower, lambda: ToyPointTower(dim=48)),
        BackboneCase("point_mae", tiny_point, lambda: tiny_point(depth=3)),
        BackboneCase("toy_reg_vit", ToyRegViT, lambda: ToyRegViT(regs=3)),
        BackboneCase(
            "clip_image", lambda: ClipImageTower(model=tiny_clip()), lambda: ClipImageTower(model=tiny_clip(width=48))
        ),
        BackboneCase(
            "clip_text", lambda: ClipTextTower(model=tiny_clip()), lambda: ClipTextTower(model=tiny_clip(text_width=48))
        ),
        BackboneCase(
            "timm_resnet", lambda: TimmModel("test_resnet", img_size=32), lambda: TimmModel("test_efficientnet")
        ),
        BackboneCase("sd_unet", tiny_unet, lambda: tiny_unet(layers_per_block=1)),
        BackboneCase("dit", tiny_dit, lambda: tiny_dit(num_layers=3)),
        BackboneCase("any2point_2d", tiny_any2point, lambda: tiny_any2point(depth=3)),
        BackboneCase("any2point_text", lambda: tiny_any2point(text=True), lambda: tiny_any2point(text=True, width=48)),
    ]


CLIP_VOCAB, CLIP_CONTEXT = 100, 16


def tiny_clip(width: int = 64, text_width: int = 32) -> nn.Module:
    """A random open_clip CLIP small enough for the conformance suite (ViT image tower, causal text tower)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=width, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=CLIP_CONTEXT, vocab_size=CLIP_VOCAB, width=text_width, heads=4, layers=2)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_any2point(text: bool = False, width: int = 32, depth: int = 2) -> nn.Module:
    """Any2Point on a tiny source: a DINOv2-style timm ViT (LayerScale, two registers, a 4 x 4 patch grid) or a
    tiny open_clip text tower (a 16-row table); 64 points, two tokenizer stages to 16 tokens of k = 8."""
    from mmpeft.backbones import Any2Point, TimmViT
    from mmpeft.backbones.clip import ClipTextTower

    if text:
        source = ClipTextTower(model=tiny_clip(text_width=width))
    else:
        source = TimmViT("test_vit", img_size=64, depth=depth, embed_dim=width, num_heads=2, reg_tokens=2,
                         init_values=0.1, no_embed_class=True)  # fmt: skip
    return Any2Point(source, num_points=64, raw_width=6, stages=2, k=8, stage_blocks=(1, 1), last_bottleneck=8)
