"""Point-PEFT (issue 25): exact counts on `meta`, the parameter-free retrieval, the query pass through `disabled()`,
batch-order equivariance (the official code fails it for B > 1), the bank kept out of the adapter file."""

from __future__ import annotations

import pytest
import torch

from mmpeft.backbones.point import PointTransformer
from mmpeft.core.model import PeftModel
from mmpeft.core.report import parameter_report
from mmpeft.core.state import read_adapter, save_adapter
from mmpeft.methods.point_peft import PROMPTS, BankMissing, PointPEFT, retrieve
from tests.conftest import tiny_point


def _scan_mae() -> PointTransformer:
    """Point-MAE as Point-PEFT fine-tunes it on ScanObjectNN: 2,048 points in 128 groups of 32."""
    return PointTransformer("point_mae", device="meta", num_group=128, group_size=32, num_points=2048)


@pytest.mark.parametrize(
    ("spec", "count"),
    [
        ({"name": "point_peft", "preset": "paper"}, 710_761),  # README "0.7M": no unused tensors in blocks 6-11
        ({"name": "point_peft", "preset": "paper", "official_unused": True}, 773_017),  # what the official code builds
        ({"name": "point_peft"}, 710_761 + 24),  # mmpeft's default learns two coefficients per block from zero
    ],
)
def test_exact_trainable_counts_with_a_15_class_head(spec, count):
    model = PeftModel(_scan_mae(), spec, num_classes=15)
    assert parameter_report(model).trainable == count
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 267_535  # the official MLP-BN head, 35% of the paper count


def test_the_paper_preset_holds_the_official_values():
    method = PointPEFT(**PointPEFT.presets["paper"])
    assert (method.init, method.query_grouping, method.prompt_blocks) == ("official", (64, 32), 6)
    assert (method.top_k, method.cache_hidden, method.adapter_hidden) == (8, 8, 16)  # 10 prompts, 384-8-384, -16-
    assert (method.centre_coef, method.propagate_coef, method.ffn_scale, method.dropout) == (0.3, 0.3, 0.7, 0.1)
    assert (method.local_width, method.local_heads) == (18, 6)  # qkv 384 -> 54, 6 heads of 3


def test_retrieval_has_no_parameters_and_finds_an_entry_first():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 16, generator=g, requires_grad=False)
    query = (bank[[7, 31]] * 3.0).requires_grad_(True)  # a scaled copy: the same direction
    cache = retrieve(query, bank, 8)
    assert cache.shape == (2, 10, 16)
    assert torch.equal(cache[:, 2], bank[[7, 31]])  # the entry itself comes first
    assert torch.equal(cache[:, 0], query.detach())
    scores = torch.nn.functional.normalize(query.detach(), dim=-1) @ torch.nn.functional.normalize(bank, dim=-1).T
    top, index = scores.topk(8)
    weights = top.softmax(-1)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(cache[:, 1], (weights.unsqueeze(-1) * bank[index]).sum(1))
    unit = torch.nn.functional.normalize(bank, dim=-1)
    assert torch.equal(retrieve(query, bank, 8, unit), cache)  # the attached bank's precomputed unit rows: the same
    cache.sum().backward()  # gradients reach the query, never the bank
    assert query.grad is not None and bank.grad is None
    with pytest.raises(ValueError, match="top_k=51 but the memory bank holds 50"):
        retrieve(query, bank, 51)


def _model(seed: int = 0, **options) -> PeftModel:
    torch.manual_seed(seed)
    model = PeftModel(tiny_point(), {"name": "point_peft", **options}, num_classes=5)
    bank = model.backbone.query_features(model.backbone.example_inputs(16, torch.Generator().manual_seed(1)))
    PointPEFT.attach_bank(model.backbone, bank, "bank.safetensors", "abc123")
    return model


def _clouds(batch: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 64, 3, generator=torch.Generator().manual_seed(seed))


def test_the_query_pass_is_the_pristine_backbone_after_the_biases_trained():
    torch.manual_seed(0)
    pristine = tiny_point().eval()
    model = _model()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(_clouds(seed=step)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    trained = model.backbone.blocks[0].attn.proj.bias
    assert not torch.equal(trained, pristine.blocks[0].attn.proj.bias)  # the biases did train in place
    clouds = _clouds(seed=9)
    torch.testing.assert_close(model.backbone.query_features(clouds), pristine.query_features(clouds), atol=0, rtol=0)


def test_shuffling_the_batch_permutes_the_outputs():
    model = _model().eval()
    clouds, order = _clouds(6), torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(clouds)[order], model(clouds[order]), atol=1e-5, rtol=0)


def test_prompts_sit_after_cls_in_the_first_blocks_only_and_leave_at_each_end():
    model = _model(prompt_blocks=1).eval()
    seen = []
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, args[0].shape[1], dict(args[1].layout))))
    with torch.no_grad():
        model(_clouds(2))
    (i0, n0, layout0), (i1, n1, layout1) = [entry for entry in seen if "cls" in entry[2]]  # not the query pass
    assert n0 == 1 + 10 + 8 and layout0[PROMPTS] == slice(1, 11) and layout0["patches"] == slice(11, 19)
    assert n1 == 1 + 8 and PROMPTS not in layout1  # removed at block 0's end; block 1 has none of its own
    assert not any(name.startswith("before_block.1") for name, _ in model.backbone.named_modules() if "prompt" in name)


def test_without_a_bank_the_forward_says_how_to_build_it():
    torch.manual_seed(0)
    model = PeftModel(tiny_point(), "point_peft", num_classes=5)
    with pytest.raises(BankMissing, match="mmpeft bank -c CONFIG"):
        model(_clouds(2))


def test_the_adapter_file_names_the_bank_and_holds_none_of_it(tmp_path):
    model = _model()
    save_adapter(model, tmp_path / "adapter.safetensors")
    tensors, header = read_adapter(tmp_path / "adapter.safetensors")
    assert not [k for k in tensors if "bank" in k]  # neither the bank nor its normalised rows
    config = header["method"]["config"]
    assert config["bank"] == "bank.safetensors" and config["bank_sha256"] == "abc123"
    assert "prompt_cor" in " ".join(tensors) and any("pool_norm.running_mean" in k for k in tensors)


def test_only_point_transformers_take_it():
    from mmpeft.core.errors import NotSupported
    from tests.toys import ToyPointTower

    with pytest.raises(NotSupported, match="point transformer"):
        PeftModel(ToyPointTower(), "point_peft", num_classes=5)


# -- the memory bank in a run: built once from the training split, cached, named by the adapter, checked -------------
@pytest.fixture(scope="module")
def scan_root(tmp_path_factory):
    from mmpeft.data.point_fixtures import write_scanobjectnn_fixture

    root = tmp_path_factory.mktemp("scan")
    write_scanobjectnn_fixture(root, "OBJ_BG", n_train=40, n_test=20, points=64)
    return root


def _fit(root, runs, *extra: str):
    from mmpeft.lab.lightning_cli import run_cli

    b, d = "--model.init_args.backbone.init_args", "--data.init_args"
    tiny = dict(num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=32)
    cli = run_cli([
        "-c", "configs/point/scanobjectnn/point_peft.yaml", *(f"{b}.{k}={v}" for k, v in tiny.items()),
        f"{b}.pointnet_widths=[16, 32, 64]", f"{d}.root={root}", f"{d}.variant=OBJ_BG", f"{d}.num_points=64",
        f"{d}.batch_size=8", f"{d}.num_workers=0", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=1", f"--run.dir={runs}", "--run.wandb=disabled", "--run.test_after_fit=false",
        "--model.init_args.method={name: point_peft, preset: paper, query_grouping: [8, 8]}", *extra,
    ], run=False)  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_a_run_builds_the_bank_once_and_the_adapter_names_it(scan_root, tmp_path, capsys, monkeypatch):
    from mmpeft.methods.point_bank import load_bank

    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))  # a cache of its own: no other test's bank

    cli = _fit(scan_root, tmp_path / "runs")
    said = capsys.readouterr().out
    train = len(cli.datamodule.data["train"][1])  # the training split, without the validation clouds
    assert "no memory bank at" in said and f"building it from the training split ({train} clouds" in said
    method = cli.model.model.method
    features, digest = load_bank(method.bank)
    assert features.shape == (train, 32) and digest == method.bank_sha256
    run = next((tmp_path / "runs").rglob("adapter.safetensors"))
    tensors, header = read_adapter(run)
    assert header["method"]["config"]["bank"] == method.bank and not [k for k in tensors if "bank" in k]
    _fit(scan_root, tmp_path / "runs")  # the same backbone and data: the cached bank, not built again
    assert "building" not in capsys.readouterr().out


def test_a_bank_of_other_data_is_refused_naming_the_difference(scan_root, tmp_path):
    from mmpeft.methods.point_bank import BankMismatch

    cli = _fit(scan_root, tmp_path / "a")
    bank = cli.model.model.method.bank
    with pytest.raises(BankMismatch, match=r"dataset: file .*seed.*0.*this run .*seed.*1"):
        _fit(
            scan_root,
            tmp_path / "b",
            "--data.init_args.seed=1",
            f"--model.init_args.method={{name: point_peft, preset: paper, query_grouping: [8, 8], bank: {bank}}}",
        )


def test_the_bank_command_builds_what_fit_then_reuses(scan_root, tmp_path, capsys, monkeypatch):
    import yaml

    from mmpeft.cli import main

    config = yaml.safe_load(open("configs/point/scanobjectnn/point_peft.yaml"))
    config["model"]["init_args"]["backbone"]["init_args"].update(
        num_points=64, num_group=8, group_size=8, depth=2, embed_dim=32, num_heads=4, encoder_dims=32,
        pointnet_widths=[16, 32, 64],
    )  # fmt: skip
    config["model"]["init_args"]["method"] = {"name": "point_peft", "preset": "paper", "query_grouping": [8, 8]}
    config["data"]["init_args"].update(root=str(scan_root), variant="OBJ_BG", num_points=64, num_workers=0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    assert main(["bank", "-c", str(path)]) == 0
    said = capsys.readouterr().out
    assert "building it from the training split" in said and "memory bank: " in said
    assert main(["bank", "-c", str(path), "--data.init_args.batch_size=4"]) == 0  # found: loading options aside
    assert "building" not in capsys.readouterr().out
    _fit(scan_root, tmp_path / "runs")  # fit with the same backbone and data uses the command's bank
    assert "building" not in capsys.readouterr().out


def test_the_bank_command_refuses_a_method_without_derived_state(tmp_path, capsys):
    from mmpeft.cli import main

    assert main(["bank", "-c", "configs/point/scanobjectnn/vpt_deep.yaml"]) != 0
    assert "builds no derived state" in capsys.readouterr().err
