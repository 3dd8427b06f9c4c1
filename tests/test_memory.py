"""The saved-for-backward breakdown (`mmpeft bench --memory`): every saved storage counted once and charged to
the module that saved it, method pieces marked, parameters left out."""

from __future__ import annotations

import argparse

import torch

from mmpeft.backbones import TimmViT
from mmpeft.bench import add_bench_arguments, measure
from mmpeft.core.model import PeftModel
from mmpeft.memory import breakdown_markdown, rows_by_pattern, saved_tensors


def model_and_batch(method: str):
    torch.manual_seed(0)
    backbone = TimmViT("test_vit", img_size=32)
    model = PeftModel(backbone, method, num_classes=10).train()
    x, y = backbone.example_batch(4, torch.Generator().manual_seed(0), 10)
    return model, x, y, backbone.example_loss


def unique_saved_bytes(model, x, y, loss_fn) -> int:
    """Independently of the module hooks: every saved storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr():
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    loss.backward()
    return sum(storages.values())


def test_total_counts_each_saved_storage_once():
    model, x, y, loss_fn = model_and_batch("lora")
    saved = saved_tensors(model, x, y, loss_fn)
    model.zero_grad()
    assert saved.total == unique_saved_bytes(model, x, y, loss_fn) > 0


def test_lora_pieces_are_marked_and_their_shared_input_is_not_counted_twice():
    model, x, y, loss_fn = model_and_batch("lora")
    saved = saved_tensors(model, x, y, loss_fn)
    rows = {r["module"]: r for r in rows_by_pattern(saved)}
    q, v = rows["backbone.blocks.*.attn.qkv.lora.deltas.q"], rows["backbone.blocks.*.attn.qkv.lora.deltas.v"]
    assert q["piece"] and v["piece"] and saved.piece_bytes() > 0
    assert v["resaved"] >= 2, "v's down-projection saves the same normed input q's did: counted once"
    assert not rows["backbone.blocks.*.mlp.act"]["piece"]
    assert "storages saved more than once" in breakdown_markdown("lora", saved)


def test_a_linear_probe_saves_nothing_inside_the_backbone():
    model, x, y, loss_fn = model_and_batch("linear")
    saved = saved_tensors(model, x, y, loss_fn)
    assert not [name for name, b in saved.bytes_by_module.items() if name.startswith("backbone") and b]
    assert not [p for p in model.backbone.parameters() if p.grad is not None]


def test_bench_worker_returns_the_breakdown_with_memory():
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--backbone", "test_vit", "--img-size", "32", "--batch", "2", "--steps", "1",
                              "--warmup", "0", "--memory"])  # fmt: skip
    row = measure(args, "ssf")
    assert row["breakdown"].startswith("### ssf:") and "| yes |" in row["breakdown"]
    assert "breakdown" not in measure(parser.parse_args(["--backbone", "test_vit", "--img-size", "32", "--batch",
                                                         "2", "--steps", "1", "--warmup", "0"]), "ssf")  # fmt: skip
