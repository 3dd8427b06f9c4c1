"""Personalization of a class-conditional DiT (issue 24 item 8's second config): a new class row after the pretrained
ones (`add_classes`), DreamBooth data with labels in place of prompts, class images per prior label made once by the
frozen model, pixel-space training (`pipeline: null`), end to end through `mmpeft fit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.backbones.dit import CLASS_TABLE
from mmpeft.cli import main
from mmpeft.core.context import BackboneInput
from mmpeft.core.model import PeftModel
from mmpeft.core.state import read_adapter
from mmpeft.data.dreambooth import PROVENANCE, DreamBoothDataModule

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/diffusion/digits_personalize.yaml"
QUICK = ["--trainer.enable_progress_bar=false", "--run.wandb=disabled", "--trainer.enable_model_summary=false"]


def tiny_dit(**kwargs):
    from mmpeft.backbones import TINY_DIT, DiffusersDiT

    return DiffusersDiT(config=TINY_DIT, name="tiny_dit", example_size=8, **kwargs)


def _tables(backbone) -> list[torch.Tensor]:
    """Each block's own class table (block 0's alone when tied)."""
    embedders = [block.norm1.emb for block in backbone.model.transformer_blocks]
    return [e.class_embedder.embedding_table.weight for e in embedders if hasattr(e, "class_embedder")]


@pytest.mark.parametrize("tie", [True, False])
def test_added_classes_keep_the_pretrained_rows_and_move_the_null_row_last(tie):
    torch.manual_seed(0)
    plain = tiny_dit(tie_embeddings=tie)
    torch.manual_seed(0)
    grown = tiny_dit(tie_embeddings=tie, add_classes=2)
    assert plain.num_classes == 10 and grown.num_classes == 12 and grown.model.config.num_embeds_ada_norm == 12
    assert len(_tables(grown)) == (1 if tie else 2)  # tiny_dit has two blocks; untied, each grows its own copy
    for old, new in zip(_tables(plain), _tables(grown), strict=True):
        assert new.shape == (13, old.shape[1])
        assert torch.equal(new[:10], old[:10]) and torch.equal(new[12], old[10])  # digits kept, null row last
        assert torch.allclose(new[10], old[:10].mean(0)) and torch.equal(new[11], new[10])
    for block in grown.model.transformer_blocks[: len(_tables(grown))]:  # the null label diffusers drops to: last
        assert block.norm1.emb.class_embedder.num_classes == 12
    # the pretrained labels give the same outputs; the grown table is the task's (trainable under LoRA)
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500, 900])
    labels = torch.tensor([0, 9, 4])
    with torch.no_grad():
        assert torch.equal(plain.eval()(BackboneInput(x, t, labels)), grown.eval()(BackboneInput(x, t, labels)))
    model = PeftModel(grown, {"name": "lora", "r": 2})
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(CLASS_TABLE)}
    assert len(trained) == (1 if tie else 2)


def test_new_rows_start_from_the_named_pretrained_labels():
    torch.manual_seed(0)
    plain = tiny_dit()
    torch.manual_seed(0)
    grown = tiny_dit(add_classes=2, new_class_init=[3, 5])  # DreamBooth's class noun: the subject's own class
    old, new = _tables(plain)[0], _tables(grown)[0]
    assert torch.equal(new[10], old[3]) and torch.equal(new[11], old[5]) and torch.equal(new[:10], old[:10])


def test_added_classes_refuse_what_does_not_fit_at_once():
    with pytest.raises(ValueError, match="num_classes .* or add_classes"):
        tiny_dit(num_classes=3, add_classes=1)
    with pytest.raises(ValueError, match=r"one pretrained label \(0..9\) per new row \(2\)"):
        tiny_dit(add_classes=2, new_class_init=[3])
    with pytest.raises(ValueError, match=r"one pretrained label \(0..9\)"):
        tiny_dit(add_classes=1, new_class_init=[10])
    with pytest.raises(ValueError, match="give add_classes as well"):
        tiny_dit(new_class_init=[3])


def _digit_folder(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = (np.random.RandomState(i).rand(8, 8) * 255).astype("uint8")
        Image.fromarray(pixels, mode="L").save(folder / f"seven{i}.png")
    return folder


def test_labelled_data_gives_label_batches_with_the_class_half_last(tmp_path):
    instance = _digit_folder(tmp_path / "instance")
    classes = tmp_path / "classes"
    for label in (0, 1):
        _digit_folder(classes / str(label), 2)
    data = DreamBoothDataModule(str(instance), instance_class=10, class_dir=str(classes), prior_classes=[0, 1],
                                num_class_images=4, image_size=8, channels=1, batch_size=2)  # fmt: skip
    assert data.num_classes == 11 and data.sample_class_ids() == [10] and data.sample_prompts() == []
    assert [(p.parent.name, label) for p, label in data.class_files()] == [("0", 0), ("0", 0), ("1", 1), ("1", 1)]
    images, labels, prior = next(iter(data.train_dataloader()))
    assert images.shape == (4, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert labels[:2].tolist() == [10, 10] and set(labels[2:].tolist()) <= {0, 1}
    assert prior.tolist() == [False] * 2 + [True] * 2
    targets = data.prior_targets([0, 1, 5])
    assert [(s, c, p.relative_to(classes).as_posix()) for s, c, p in targets] == [
        (0, 0, "0/class-00000.png"), (1, 1, "1/class-00001.png"), (5, 1, "1/class-00005.png")
    ]  # fmt: skip


def test_labelled_options_that_do_not_fit_are_refused(tmp_path):
    instance = _digit_folder(tmp_path / "instance")
    with pytest.raises(ValueError, match="instance_prompt .* or instance_class"):
        DreamBoothDataModule(str(instance), "a photo of sks dog", instance_class=10)
    with pytest.raises(ValueError, match="prior_classes, a text one with class_prompt"):
        DreamBoothDataModule(str(instance), instance_class=10, class_dir=str(tmp_path / "c"), class_prompt="a 7")
    with pytest.raises(ValueError, match="both class_dir and prior_classes"):
        DreamBoothDataModule(str(instance), instance_class=10, class_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="channels must be 3"):
        DreamBoothDataModule(str(instance), instance_class=10, channels=2)


def _fit(instance: Path, classes: Path, runs: Path, *extra: str) -> int:
    return main(["fit", "-c", str(CONFIG), *QUICK, f"--data.init_args.instance_dir={instance}",
                 f"--data.init_args.class_dir={classes}", "--data.init_args.num_class_images=4",
                 "--data.init_args.class_steps=2", "--trainer.max_epochs=1", f"--run.dir={runs}",
                 "--model.init_args.backbone.init_args.pretrained=false",  # random weights: the plumbing only
                 "--model.init_args.samples={every_n_steps: 0, class_ids: [10, 3], seeds: [0, 1], steps: 2}",
                 *extra])  # fmt: skip


def test_class_personalization_end_to_end_in_pixel_space(tmp_path, capsys):
    instance, classes = _digit_folder(tmp_path / "instance"), tmp_path / "classes"
    assert _fit(instance, classes, tmp_path / "runs", "--data.init_args.prior_classes=[3, 5]") == 0
    assert "generating 4 class images of classes [3, 5]" in capsys.readouterr().out
    made = sorted(p.relative_to(classes).as_posix() for p in classes.rglob("*.png"))
    assert made == ["3/class-00000.png", "3/class-00002.png", "5/class-00001.png", "5/class-00003.png"]
    assert Image.open(classes / "3" / "class-00000.png").mode == "L"  # one channel, as the model draws
    record = json.loads((classes / PROVENANCE).read_text())
    assert record["prior_classes"] == [3, 5] and "class_prompt" not in record
    run = tmp_path / "runs" / "digits-personalize" / "version_0"
    tensors, header = read_adapter(run / "adapter.safetensors")
    table = [v for k, v in tensors.items() if k.endswith(CLASS_TABLE)]
    assert header["method"]["name"] == "lora" and len(table) == 1 and table[0].shape == (12, 64)  # 11 + null
    assert Image.open(run / "samples" / "final" / "grid.png").size == (2 * 8, 2 * 8)  # classes 10, 3 x seeds 0, 1
    before = {p: p.read_bytes() for p in classes.rglob("*.png")}
    assert _fit(instance, classes, tmp_path / "runs", "--data.init_args.prior_classes=[3, 5]") == 0
    assert "generating" not in capsys.readouterr().out
    assert {p: p.read_bytes() for p in classes.rglob("*.png")} == before
    # other prior labels: refused before training, the folder untouched
    assert _fit(instance, classes, tmp_path / "runs", "--data.init_args.prior_classes=[3, 4]") == 2
    assert "made with other settings" in capsys.readouterr().err


def test_a_label_past_the_grown_table_is_refused_naming_add_classes(tmp_path, capsys):
    instance = _digit_folder(tmp_path / "instance")
    code = _fit(instance, tmp_path / "classes", tmp_path / "runs", "--data.init_args.instance_class=11",
                "--data.init_args.class_dir=null", "--data.init_args.prior_classes=null")  # fmt: skip
    assert code == 2 and "num_classes = 11" in capsys.readouterr().err


def test_the_personalization_config_holds_the_values_it_cites():
    import yaml

    from mmpeft.backbones.digits_dit import DIGITS_SCHEDULE
    from mmpeft.lab.diffusion_transfer import DIFFUSION_RUNS

    config = yaml.safe_load(CONFIG.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["prior_loss_weight"] == 1.0  # diffusers' DreamBooth default
    assert {k: model[k] for k in DIGITS_SCHEDULE} == DIGITS_SCHEDULE  # the digits DiT's own schedule
    assert (model["method"], model["lr"]) == ({"name": "lora", "r": 8}, pytest.approx(0.3 * DIFFUSION_RUNS["lora"][1]))
    assert data["prior_classes"] == list(range(10)) and data["instance_class"] == 10
    assert model["backbone"]["init_args"] == {"add_classes": 1, "new_class_init": [7]}  # "a sks seven"
