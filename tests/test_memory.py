"""The saved-for-backward breakdown (`mmpeft bench --memory`): every saved storage counted once and charged to
the module that saved it, method pieces marked, parameters left out."""

from __future__ import annotations

import argparse

import torch

from mmpeft.backbones import TimmViT
from mmpeft.core.model import PeftModel
from mmpeft.lab.bench import add_bench_arguments, measure
from mmpeft.lab.memory import breakdown_markdown, rows_by_pattern, saved_tensors


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


def test_lora_pieces_are_marked_and_save_only_their_input_and_rank_r_activations():
    model, x, y, loss_fn = model_and_batch("lora")
    saved = saved_tensors(model, x, y, loss_fn)
    rows = {r["module"]: r for r in rows_by_pattern(saved)}
    lora = rows["backbone.blocks.*.attn.qkv.lora"]
    assert lora["piece"] and saved.piece_bytes() > 0
    assert not rows["backbone.blocks.*.mlp.act"]["piece"]
    assert "storages saved more than once" in breakdown_markdown("lora", saved)
    # per block at most: the normed input (for A's gradient) once, shared by q and v, the rank-2r
    # down-projection, and the stacked factors (weight-sized, no activation)
    tokens, width, depth = 4 * (4 + 1), model.backbone.embed_dim, len(model.backbone.blocks)
    activations = tokens * (width + 2 * 8) * 4
    assert activations * depth <= saved.piece_bytes() <= depth * (activations + (3 * width + width) * 16 * 4)


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


# -- memory work: each change equal in outputs and gradients, and saving less -------------------------------


def _outputs_and_grads(model, x, y, loss_fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # drop-path draws
    out = model(x)
    loss_fn(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a, b, rtol=1e-4):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp_min(1e-12)
        assert (grads_a[name] - grads_b[name]).abs().max() / scale < rtol, name


def test_fused_low_rank_parts_equal_the_per_part_route_and_allocate_one_output():
    from mmpeft.core.fused import add_low_rank_to_parts, add_to_parts
    from mmpeft.core.modules import LowRank

    torch.manual_seed(0)
    deltas = {p: LowRank(16, 8, 4, alpha=8) for p in "qv"}
    for d in deltas.values():
        torch.nn.init.normal_(d.B)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = torch.randn(2, 5, 24, requires_grad=True)
    tensors = [x, y] + [t for d in deltas.values() for t in (d.A, d.B)]
    reference = add_to_parts(y, deltas, x)
    fused = add_low_rank_to_parts(y, deltas, x)
    grad = torch.randn_like(reference)
    torch.testing.assert_close(fused, reference)
    for a, b in zip(torch.autograd.grad(reference, tensors, grad), torch.autograd.grad(fused, tensors, grad)):
        torch.testing.assert_close(a, b)
    assert torch.equal(fused[..., 8:16], y[..., 8:16]), "k's third untouched"


def test_lean_ssf_equals_the_official_form_in_outputs_and_gradients_and_saves_less():
    from mmpeft.methods.ssf import SSF

    results, saved = [], []
    for lean in (False, True):
        model, x, y, loss_fn = model_and_batch(SSF(lean_memory=lean))
        results.append(_outputs_and_grads(model, x, y, loss_fn))
        saved.append(saved_tensors(model, x, y, loss_fn))
    _assert_close(*results)
    floor, _, _, _ = model_and_batch("linear")
    official, lean = saved
    # the official form saves every pre-scale activation (8 positions per block); the lean one keeps none
    # of its own after a norm, and after qkv / fc1 shares the tensor attention / GELU keep anyway
    assert lean.total < 0.7 * official.total
    rows = {r["module"]: r for r in rows_by_pattern(lean)}
    norm_input = rows["backbone.blocks.*.norm1.ssf"]["MiB"]
    assert norm_input == rows["backbone.blocks.*.norm2.ssf"]["MiB"] > 0  # only the norm's own input
    assert rows.get("backbone.blocks.*.mlp.act", {"MiB": 0})["MiB"] == 0, "GELU's input is SSF's saved output"


def test_lean_ssf_merges_exactly_and_switches_off_with_the_method():
    from mmpeft.core.pristine import disabled
    from mmpeft.methods.ssf import SSF

    model, x, _, _ = model_and_batch(SSF(lean_memory=True))
    model.eval()
    with torch.no_grad():
        before = model(x)
        with disabled(model.backbone):
            plain = model(x)
        model.merge()
        merged = model(x)
        model.unmerge()
        again = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, before, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, before)


def test_scaled_linear_equals_the_linear_then_the_scale_shift_in_outputs_and_gradients():
    from mmpeft.core.modules import ScaleShift, linear_then_scale

    torch.manual_seed(0)
    host, piece = torch.nn.Linear(5, 6), ScaleShift(6, "normal", 0.1)
    host.weight.requires_grad_(False)  # frozen weight, trainable bias (SSF with BitFit-style bias tuning)
    x = torch.randn(2, 3, 5, requires_grad=True)
    grad = torch.randn(2, 3, 6)
    lean, plain = linear_then_scale(host, x, piece.gamma, piece.beta), piece(host(x))
    torch.testing.assert_close(lean, plain)
    wrt = [x, host.bias, piece.gamma, piece.beta]
    for a, b in zip(torch.autograd.grad(lean, wrt, grad), torch.autograd.grad(plain, wrt, grad)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(linear_then_scale(host, x, piece.gamma, piece.beta), plain)
    scale_only = linear_then_scale(host, x, piece.gamma)  # DiffFit's γ: no shift
    wrt = [x, host.bias, piece.gamma]
    for a, b in zip(torch.autograd.grad(scale_only, wrt, grad),
                    torch.autograd.grad(host(x) * piece.gamma, wrt, grad)):  # fmt: skip
        torch.testing.assert_close(a, b)


def test_lean_ssf_keeps_bf16_outputs_under_autocast():
    """Under autocast the linear's output is bf16; the in-place scale-shift keeps that dtype (as the merged
    layer would), so attention and GELU keep the same tensor instead of a bf16 copy of an fp32 one."""
    from mmpeft.core.modules import ScaleShift, linear_then_scale

    host, piece = torch.nn.Linear(8, 8), ScaleShift(8, "normal", 0.1)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_then_scale(host, x, piece.gamma, piece.beta)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert piece.gamma.grad.dtype == torch.float32 and torch.isfinite(piece.gamma.grad).all()


def test_activation_checkpointing_saves_less_on_every_backbone():
    from tests.conftest import backbone_cases

    for case in backbone_cases():
        totals = []
        for ckpt in (False, True):
            torch.manual_seed(0)
            backbone = case.build()
            model = PeftModel(backbone, "lora" if case.name not in ("timm_resnet",) else "bitfit",
                              num_classes=3 if backbone.num_features else None).train()  # fmt: skip
            backbone.set_grad_checkpointing(ckpt)
            x, y = backbone.example_batch(2, torch.Generator().manual_seed(0), 3 if backbone.num_features else None)
            totals.append(saved_tensors(model, x, y, backbone.example_loss).total)
        assert totals[1] < totals[0], (case.name, totals)


def test_process_peak_is_the_peak_after_start_not_before():
    """Anonymous mappings give fresh pages whatever the allocator keeps from earlier tests (a freed heap block
    reused by a new tensor would not raise the resident-set peak at all)."""
    import mmap

    from mmpeft.core.process_memory import ProcessPeak

    def touch(mib: int) -> None:
        block, chunk = mmap.mmap(-1, mib * 2**20), b"x" * 2**20
        for _ in range(mib):  # every page resident, in 1 MiB writes (no second copy of the block)
            block.write(chunk)
        block.close()

    touch(40)  # before start: not counted
    peak = ProcessPeak(torch.device("cpu"))
    peak.start()
    touch(64)
    measured = peak.stop() / 2**20
    assert 60 <= measured < 100, (measured, peak.kind)


def test_process_peak_windows_share_the_first_baseline_and_the_sampler_fallback_agrees(monkeypatch):
    """Per-epoch windows (`RunStats`) measure against the post-build baseline; where /proc is missing a
    sampling thread stands in and reads the same kind of number."""
    import mmap
    import time

    from mmpeft.core.process_memory import ProcessPeak

    def hold(mib: int) -> None:
        block, chunk = mmap.mmap(-1, mib * 2**20), b"x" * 2**20
        for _ in range(mib):
            block.write(chunk)
        time.sleep(0.05)  # long enough for the sampler to see it
        block.close()

    peak = ProcessPeak(torch.device("cpu"))
    peak.start()
    hold(64)
    first = peak.stop() / 2**20
    peak.start(keep_baseline=True)
    hold(32)
    second = peak.stop() / 2**20
    assert peak.kind == "vmhwm" and 60 <= first < 100 and 28 <= second < first, (first, second)

    def no_proc(field: str) -> int:
        raise OSError("no /proc")

    monkeypatch.setattr(ProcessPeak, "_status", staticmethod(no_proc))
    sampled = ProcessPeak(torch.device("cpu"))
    sampled.start()
    hold(64)
    measured = sampled.stop() / 2**20
    assert sampled.kind == "sampled_rss" and 60 <= measured < 100, measured


def test_lean_scale_shift_names_the_fix_when_a_later_in_place_op_changes_its_output():
    import pytest

    from mmpeft.core.modules import ScaleShift, linear_then_scale

    piece = ScaleShift(4, "normal")
    out = linear_then_scale(torch.nn.Linear(4, 4), torch.randn(3, 4, requires_grad=True), piece.gamma, piece.beta)
    torch.relu_(out)
    with pytest.raises(RuntimeError, match="lean_memory: false"):
        out.sum().backward()
