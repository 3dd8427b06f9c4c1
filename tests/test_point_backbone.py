"""The Point-MAE / Point-BERT transformer: exact counts, official checkpoints, the forward the papers run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpeft.backbones import PointTransformer, create_backbone
from mmpeft.backbones.point import load_point_checkpoint, official_state_dict
from mmpeft.cli import main
from mmpeft.core.errors import ConfigMismatch, WeightsUnavailable
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report
from mmpeft.ops.point import group
from tests.conftest import tiny_point


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_point_mae_counts_on_meta_match_the_spec():
    b = create_backbone("point_mae", device="meta")
    assert count(b) == 21_825_792
    assert count(b.encoder) == 494_464 and count(b.pos_embed) == 50_048 and count(b.blocks[0]) == 1_773_312
    assert b.blocks[0].attn.qkv.bias is None and b.blocks[0].attn.proj.bias is not None
    assert b.num_features == 768
    for classes, head in ((15, 267_535), (40, 273_960)):
        r = parameter_report(PeftModel(create_backbone("point_mae", device="meta"), "linear", num_classes=classes))
        assert r.backbone == 21_825_792 and r.trainable == head


def test_point_bert_counts_on_meta_match_the_spec():
    b = create_backbone("point_bert", device="meta")
    assert count(b) == 21_858_816
    assert count(b.encoder) == 428_800 and count(b.reduce_dim) == 98_688
    r = parameter_report(PeftModel(create_backbone("point_bert", device="meta"), "linear", num_classes=40))
    assert r.trainable == 207_144  # Point-BERT's smaller head, 40 logits (its ScanObjectNN configs too)


def test_params_cli_on_the_point_backbone(capsys):
    assert main(["params", "--backbone", "point_mae", "--num-classes", "15"]) == 0
    out = capsys.readouterr().out
    assert "| linear | 267,535 | 0 |" in out and "| vpt |" in out and "| ssf |" in out


def official_forward(model: PointTransformer, xyz: torch.Tensor) -> torch.Tensor:
    """Point-MAE's fine-tuning forward written out as the official code runs it (`x = block(x + pos)`)."""
    neighbourhood, centres = group(xyz, model.num_group, model.group_size)
    x = torch.cat([model.cls_token.expand(len(xyz), -1, -1), model.encoder(neighbourhood)], dim=1)
    pos = torch.cat([model.cls_pos.expand(len(xyz), -1, -1), model.pos_embed(centres)], dim=1)
    for block in model.blocks:
        x = x + pos
        h = block.norm1(x)
        b, n, c = h.shape
        heads = block.attn.num_heads
        q, k, v = (h @ block.attn.qkv.weight.T).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
        x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        x = x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))
    x = model.norm(x)
    return torch.cat([x[:, 0], x[:, 1:].max(1).values], dim=-1)


def test_forward_is_the_official_one_with_positions_before_every_block():
    model = tiny_point().eval()
    xyz = torch.randn(3, 64, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(xyz), official_forward(model, xyz), atol=1e-5, rtol=1e-5)


def test_batch_shuffle_permutes_outputs_identically():
    model = tiny_point(drop_path_rate=0.0)
    xyz = torch.randn(6, 64, 3)
    perm = torch.randperm(6)
    for mode in (False, True):  # eval, and training with the fixed FPS start (frozen BatchNorms in eval)
        peft = PeftModel(model, "linear", num_classes=4, head="linear").train(mode)  # no head dropout
        with torch.no_grad():
            torch.testing.assert_close(peft(xyz)[perm], peft(xyz[perm]), atol=1e-5, rtol=1e-5)
        model = tiny_point(drop_path_rate=0.0)


def test_point_order_does_not_matter_when_fps_starts_at_the_same_point():
    model = tiny_point().eval()
    xyz = torch.randn(2, 64, 3)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(63)])
    with torch.no_grad():
        torch.testing.assert_close(model(xyz), model(xyz[:, perm]), atol=1e-5, rtol=1e-5)


def test_random_fps_start_is_drawn_in_training_only_and_replayed():
    model = tiny_point(fps_start="random", drop_path_rate=0.0)
    xyz = torch.randn(2, 64, 3)
    model.train()
    torch.manual_seed(1)
    a = model(xyz)
    torch.manual_seed(2)
    b = model(xyz)
    assert not torch.allclose(a, b), "another seed draws other FPS starts"
    torch.manual_seed(1)
    torch.testing.assert_close(model(xyz), a)
    model.eval()
    torch.manual_seed(3)
    first = model(xyz)
    torch.manual_seed(4)
    torch.testing.assert_close(model(xyz), first)


def test_frozen_batchnorms_stay_in_eval_mode_and_keep_their_statistics():
    model = PeftModel(tiny_point(), "lora", num_classes=4).train()
    bn = model.backbone.encoder.first_conv[1]
    assert not bn.training
    before = bn.running_mean.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(torch.randn(4, 64, 3)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(bn.running_mean, before)


def test_default_head_is_the_papers_and_a_config_can_replace_it():
    model = PeftModel(tiny_point(), "linear", num_classes=5)
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert model.head_config["hidden"] == [256, 256]
    assert isinstance(PeftModel(tiny_point(), "linear", num_classes=5, head="linear").head, torch.nn.Linear)
    bert = PeftModel(PointTransformer("point_bert", device="meta"), "linear", num_classes=40).head
    assert [type(m).__name__ for m in bert] == ["Linear", "ReLU", "Dropout", "Linear"]


def test_grouping_in_the_backbone_is_fp32_under_bf16_autocast():
    model = tiny_point(num_points=1024, num_group=64, group_size=32).eval()
    xyz = torch.randn(2, 1024, 3, generator=torch.Generator().manual_seed(0))
    groups, tokens = [], []
    model.encoder.register_forward_pre_hook(lambda module, args: groups.append(args[0]))
    model.encoder.register_forward_hook(lambda module, args, out: tokens.append(out))
    with torch.no_grad():
        model(xyz)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(xyz)
    assert tokens[1].dtype == torch.bfloat16, "the network around the point ops runs in bf16"
    assert groups[1].dtype == torch.float32 and torch.equal(groups[1], groups[0]), "the fp32 neighbourhoods"


def test_bad_inputs_are_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\[B, N, 3\] point clouds"):
        tiny_point()(torch.randn(2, 3, 64))


def test_point_mae_token_width_follows_embed_dim_and_a_contradiction_is_refused_at_build():
    model = PointTransformer("point_mae", num_points=64, num_group=8, group_size=8, depth=1, embed_dim=48,
                             num_heads=4, pointnet_widths=(16, 32, 64))  # fmt: skip
    assert model.encoder.out_dim == 48 and model(torch.randn(2, 64, 3)).shape == (2, 96)
    with pytest.raises(ConfigMismatch, match=r"encoder_dims=32 but embed_dim=48.*set encoder_dims=48 or leave it"):
        tiny_point(embed_dim=48)
    bert = PointTransformer("point_bert", num_points=64, num_group=8, group_size=8, depth=1, embed_dim=48,
                            num_heads=4, pointnet_widths=(16, 32, 64))  # fmt: skip
    assert bert.encoder.out_dim == 256 and bert.reduce_dim.out_features == 48, "Point-BERT: 256, then reduce_dim"
    with pytest.raises(ConfigMismatch, match=r"embed_dim=32 does not split into num_heads=5"):
        tiny_point(num_heads=5)


@pytest.mark.parametrize("option, value", [("group_size", 65), ("num_group", 80)])
def test_a_grouping_larger_than_the_cloud_is_refused_at_build(option, value):
    with pytest.raises(ConfigMismatch, match=rf"{option}={value}.*at least {value} points, and num_points=64"):
        tiny_point(**{option: value})


# -- official checkpoints -----------------------------------------------------------------------------------
def _official(model: PointTransformer, prefix: str, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = official_state_dict(model.state_dict())
    assert "blocks.blocks.0.attn.qkv.weight" in keys
    return {f"module.{prefix}{k}": v.clone() for k, v in keys.items()} | extra


def test_point_mae_pretrain_checkpoint_loads_and_reports_fresh_tensors(tmp_path, capsys):
    source = tiny_point()
    state = _official(source, "MAE_encoder.", {
        "module.MAE_decoder.blocks.blocks.0.norm1.weight": torch.ones(32),
        "module.mask_token": torch.zeros(1, 1, 32),
        "module.increase_dim.0.weight": torch.zeros(8, 32, 1),
    })  # fmt: skip
    for fresh in ("cls_token", "cls_pos"):  # the pretraining encoder has no cls token
        del state[f"module.MAE_encoder.{fresh}"]
    path = tmp_path / "pretrain.pth"
    torch.save({"base_model": state, "epoch": 300, "metrics": {"acc": 0.0}}, path)
    target = tiny_point()
    report = load_point_checkpoint(target, str(path))
    assert report["fresh"] == ["cls_pos", "cls_token"]
    assert len(report["ignored"]) == 3
    for key, value in source.state_dict().items():
        if key not in ("cls_token", "cls_pos"):
            assert torch.equal(target.state_dict()[key], value), key
    assert "fresh: ['cls_pos', 'cls_token']" in capsys.readouterr().out


def test_finetuned_checkpoint_with_its_head_loads_the_cls_token(tmp_path):
    source = tiny_point()
    state = _official(source, "", {"module.cls_head_finetune.0.weight": torch.zeros(256, 64)})
    path = tmp_path / "ckpt-best.pth"
    torch.save({"base_model": state}, path)
    target = tiny_point(weights=str(path))
    assert torch.equal(target.cls_token, source.cls_token)
    assert target.load_report["fresh"] == [] and target.load_report["ignored"] == ["cls_head_finetune.0.weight"]


def test_point_bert_checkpoint_keeps_the_query_encoder_only(tmp_path):
    tiny = dict(num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=16,
                pointnet_widths=(16, 32, 64))  # fmt: skip
    source = PointTransformer("point_bert", **tiny)
    state = _official(source, "transformer_q.", {})
    state |= {k.replace("transformer_q.", "transformer_k."): v * 0 for k, v in state.items()}  # momentum copy
    state["module.transformer_q.cls_head_finetune.0.weight"] = torch.zeros(4, 4)
    state["module.dvae.encoder.first_conv.0.weight"] = torch.zeros(4, 3, 1)
    path = tmp_path / "Point-BERT.pth"
    torch.save({"base_model": state}, path)
    target = PointTransformer("point_bert", weights=str(path), **tiny)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    assert target.load_report["fresh"] == []


def test_checkpoints_of_another_model_are_refused_and_load_nothing(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"base_model": _official(tiny_point(), "MAE_encoder.", {})}, path)
    target = tiny_point(depth=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsUnavailable, match=r"does not fit point_mae \(depth 3.*blocks\.2\."):
        load_point_checkpoint(target, str(path))
    torch.save({"base_model": _official(tiny_point(depth=3, embed_dim=48, encoder_dims=48), "MAE_encoder.", {})}, path)
    with pytest.raises(WeightsUnavailable, match="another shape"):
        load_point_checkpoint(target, str(path))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


class _Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"base_model": {"x": _Payload()}}, f)
    with pytest.raises(WeightsUnavailable, match="weights_only"):
        load_point_checkpoint(tiny_point(), str(path))
    assert "executed" not in capsys.readouterr().out


# -- official fine-tuned checkpoints: their head goes to the task head ------------------------------------------
def _official_head(variant: str, in_features: int, num_classes: int) -> torch.nn.Sequential:
    """The official fine-tuning head (`cls_head_finetune`), written as Point-MAE / Point-BERT define it, with
    BatchNorm statistics that are not the defaults (so loading them is checked)."""
    nn = torch.nn
    if variant == "point_bert":
        return nn.Sequential(nn.Linear(in_features, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                             nn.Linear(256, num_classes))  # fmt: skip
    head = nn.Sequential(
        nn.Linear(in_features, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes),
    )  # fmt: skip
    for bn in (head[1], head[5]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(1234)
    return head


def _finetuned_file(path, source: PointTransformer, head: torch.nn.Module, **extra) -> str:
    """A fine-tuned checkpoint in the official layout: `module.`-prefixed model keys (`blocks.blocks.<i>`) and the
    head as `cls_head_finetune.*`, with the runner's epoch and metrics beside them."""
    state = _official(source, "", {f"module.cls_head_finetune.{k}": v.clone() for k, v in head.state_dict().items()})
    torch.save({"base_model": state, "epoch": 300, "metrics": {"acc": 90.0}, **extra}, path)
    return str(path)


def test_finetuned_point_mae_checkpoint_gives_its_head_to_the_default_head(tmp_path, capsys):
    source = tiny_point().eval()
    official = _official_head("point_mae", source.num_features, 15).eval()
    path = _finetuned_file(tmp_path / "scan_objbg.pth", source, official)
    backbone = tiny_point(weights=path)
    assert backbone.load_report["head"] == sorted(f"cls_head_finetune.{k}" for k in official.state_dict())
    assert (
        backbone.load_report["ignored"] == [] and "head (15 classes) goes to the task head" in capsys.readouterr().out
    )
    model = PeftModel(backbone, "linear", num_classes=15).eval()
    assert model.head_source == path
    for key, value in official.state_dict().items():
        assert torch.equal(model.head.state_dict()[key], value), key
    xyz = torch.randn(4, 64, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(xyz), official(official_forward(source, xyz)), atol=1e-5, rtol=1e-5)


def test_finetuned_point_bert_checkpoint_gives_its_head_to_the_default_head(tmp_path):
    tiny = dict(num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=16,
                pointnet_widths=(16, 32, 64))  # fmt: skip
    source = PointTransformer("point_bert", **tiny).eval()
    official = _official_head("point_bert", source.num_features, 40).eval()  # cls_dim 40, also for ScanObjectNN
    path = _finetuned_file(tmp_path / "ModelNet_1k.pth", source, official)
    model = PeftModel(PointTransformer("point_bert", weights=path, **tiny), "linear", num_classes=40).eval()
    xyz = torch.randn(3, 64, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(xyz), official(source(xyz)), atol=1e-5, rtol=1e-5)


def test_a_head_that_cannot_take_the_checkpoints_head_is_refused_unless_asked(tmp_path):
    path = _finetuned_file(tmp_path / "modelnet_1k.pth", tiny_point(), _official_head("point_mae", 64, 40))
    with pytest.raises(WeightsUnavailable, match=r"40 classes\), but the task builds .*15 classes\).*load_head"):
        PeftModel(tiny_point(weights=path), "linear", num_classes=15)
    with pytest.raises(WeightsUnavailable, match=r"builds a linear head \(15 classes\).*num_classes=40"):
        PeftModel(tiny_point(weights=path), "linear", num_classes=15, head="linear")
    fresh = tiny_point(weights=path, load_head=False)
    assert fresh.load_report["head"] == [] and len(fresh.load_report["ignored"]) == 16
    model = PeftModel(fresh, "linear", num_classes=15)
    assert model.head_source is None and model.head[-1].out_features == 15


def _legacy_numpy_names(path) -> None:
    """Rewrite a (legacy-format) checkpoint as numpy 1 pickled it: `numpy.core.multiarray.scalar`."""
    data = path.read_bytes()
    assert data.count(b"numpy._core.multiarray\nscalar") == 1
    path.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))


@pytest.mark.parametrize("numpy_names", ["numpy 2", "numpy 1"])
def test_numpy_scalar_metrics_in_a_point_bert_checkpoint_load(tmp_path, numpy_names):
    source = tiny_point()
    path = tmp_path / "Point-BERT.pth"
    metrics = {"acc": np.float64(93.2), "epoch": np.int64(300), "loss": np.float32(0.25), "best": np.bool_(True)}
    torch.save({"base_model": _official(source, "", {}), "metrics": metrics}, path,
               _use_new_zipfile_serialization=numpy_names == "numpy 2")  # fmt: skip
    if numpy_names == "numpy 1":
        _legacy_numpy_names(path)
    target = tiny_point(weights=str(path))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("payload", [np.array([93.2]), np.random.default_rng(0)])
def test_other_numpy_globals_in_a_checkpoint_are_still_refused(tmp_path, payload):
    path = tmp_path / "other.pth"
    torch.save({"base_model": _official(tiny_point(), "", {}), "metrics": {"acc": payload}}, path)
    with pytest.raises(WeightsUnavailable, match="weights_only"):
        tiny_point(weights=str(path))


def _fit_head(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, steps: int = 40) -> None:
    """Train a head on fixed features (a stand-in for the official fine-tuning), then leave it in eval mode."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    head.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        opt.step()
    head.eval()


def test_mmpeft_test_with_a_finetuned_checkpoint_scores_its_own_head(tmp_path):
    """`mmpeft test` on the official fine-tuned file alone (no adapter): the test accuracy of the official model."""
    from mmpeft.cli import run_cli
    from mmpeft.data import ScanObjectNNDataModule
    from mmpeft.data.point_fixtures import write_scanobjectnn_fixture

    root = write_scanobjectnn_fixture(tmp_path / "scan", "OBJ_BG", n_train=30, n_test=45, points=64)
    data = ScanObjectNNDataModule(str(root), "OBJ_BG", num_points=64)
    clouds, labels = (torch.cat(parts) for parts in zip(*data.test_dataloader()))
    source = tiny_point().eval()
    official = _official_head("point_mae", source.num_features, 15)
    with torch.no_grad():
        features = official_forward(source, clouds)
    _fit_head(official, features, labels)
    with torch.no_grad():
        correct = int((official(features).argmax(-1) == labels).sum())
    assert correct / 45 > 0.5, "the official model knows the test set (a random head scores about 1/15)"
    path = _finetuned_file(tmp_path / "scan_objbg.pth", source, official)
    b, d = "--model.init_args.backbone.init_args", "--data.init_args"
    tiny = dict(num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=32)
    cli = run_cli([
        "test", "-c", "configs/point/scanobjectnn/linear.yaml", f"{b}.weights={path}",
        *(f"{b}.{k}={v}" for k, v in tiny.items()), f"{b}.pointnet_widths=[16, 32, 64]",
        f"{d}.root={root}", f"{d}.variant=OBJ_BG", f"{d}.num_points=64", f"{d}.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", f"--run.dir={tmp_path / 'runs'}",
        "--run.wandb=disabled",
    ])  # fmt: skip
    assert float(cli.trainer.callback_metrics["test/acc"]) == float(torch.tensor(correct / 45))
    assert all(torch.equal(cli.model.model.head.state_dict()[k], v) for k, v in official.state_dict().items())
