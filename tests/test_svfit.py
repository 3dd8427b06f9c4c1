"""SVFit specifics beyond the conformance suite: SD1.5 count, delta form, adapter file, conv, energy ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.core.errors import NotSupported
from mmpeft.core.method import create_method
from mmpeft.core.model import PeftModel
from mmpeft.core.state import adapter_from_file, read_adapter, save_adapter
from mmpeft.methods.svfit import Spectrum, SVFit, derived_state_bytes, energy_rank, svfit_ranks
from tests.conftest import tiny_unet
from tests.test_counts import SD15_UNET

CONVS = ("conv_in", "*resnets.*.conv1", "*downsamplers.0.conv")  # 3x3 convs, stride 1 and 2


def unet_model(seed: int = 0, **config) -> PeftModel:
    torch.manual_seed(seed)
    backbone = tiny_unet()
    return PeftModel(backbone, create_method("svfit", **config))


def batch(model: PeftModel, seed: int = 0):
    return model.backbone.example_batch(2, torch.Generator().manual_seed(seed))


def run(model: PeftModel, seed: int = 99) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch(model, seed)[0])


def train(model: PeftModel, steps: int = 3, lr: float = 0.05) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        x, y = batch(model, step)
        opt.zero_grad()
        model.backbone.example_loss(model(x), y).backward()
        opt.step()


def pristine(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    backbone = tiny_unet().eval()
    with torch.no_grad():
        return backbone(backbone.example_batch(2, torch.Generator().manual_seed(99))[0])


def spectra(model: PeftModel) -> list[Spectrum]:
    return [m for m in model.backbone.modules() if isinstance(m, Spectrum)]


# -- counts and memory ------------------------------------------------------------------------------------


def test_sd15_full_spectrum_on_the_128_attention_linears_is_93_696():
    """SVFit (Sun et al. 2024): 93,696 trainable, 8.5x fewer than LoRA-r4's 797,184 on the same linears; U_r, V_r,
    sigma0 in fp32 are r (out + in + 1) numbers per matrix (shapes only on meta: no SVD there)."""
    from mmpeft.backbones import DiffusersUNet
    from mmpeft.core.report import parameter_report

    model = PeftModel(DiffusersUNet(config=SD15_UNET, device="meta"), "svfit")
    r = parameter_report(model)
    assert (r.backbone, r.trainable, r.head) == (859_520_964, 93_696, 0)
    ranks = svfit_ranks(model.backbone)
    assert len(ranks) == 128 and sum(ranks.values()) == 93_696
    linears = [m for n, m in model.backbone.named_modules() if hasattr(m, "svfit")]
    analytic = sum(4 * min(m.in_features, m.out_features) * (m.in_features + m.out_features + 1) for m in linears)
    assert derived_state_bytes(model.backbone) == analytic == 720_582_656


def test_energy_needs_real_weights_not_meta():
    from mmpeft.backbones import DiffusersUNet

    with pytest.raises(NotSupported, match="meta-device backbone"):
        PeftModel(DiffusersUNet(config=SD15_UNET, device="meta"), create_method("svfit", preset="paper"))


def test_tiny_unet_counts_and_derived_state_outside_the_state_dict():
    model = unet_model()
    linears = [m for m in model.backbone.modules() if hasattr(m, "svfit")]
    assert len(linears) == 48
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        min(m.in_features, m.out_features) for m in linears
    )
    assert derived_state_bytes(model.backbone) == sum(
        4 * min(m.in_features, m.out_features) * (m.in_features + m.out_features + 1) for m in linears
    )
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith((".U", ".Vh", ".sigma0"))], "derived state is not in the state dict"
    assert all(k.endswith(".sigma") for k in model.trainable_state_dict())


def test_fixed_r_keeps_the_top_singular_values_and_caps_at_full_rank():
    model = unet_model(r=4)
    for s in spectra(model):
        assert s.rank == 4 and s.sigma.shape == (4,) and s.U.shape[1] == 4 and s.Vh.shape[0] == 4
        assert bool((s.sigma0[:-1] >= s.sigma0[1:]).all()), "descending: the top ones"
    huge = unet_model(r=10_000)
    assert all(s.rank == min(s.U.shape[0], s.Vh.shape[1]) for s in spectra(huge))
    with pytest.raises(ValueError, match="r must be positive"):
        create_method("svfit", r=0)


# -- delta form: identity, reconstruction, merge --------------------------------------------------------


def test_identity_at_init_is_exact_and_the_factors_reconstruct_w():
    """sigma starts bit-equal to sigma0, so the delta U (0 * V^T x) is exactly zero: the output equals the frozen
        UNet's bit for bit (no SVD reconstruction error enters: the delta route adds an exact zero to W x, the fold
    route multiplies by W + 0 = W). The factors
        themselves reconstruct W to fp32 accuracy."""
    model = unet_model()
    assert torch.equal(run(model), pristine())
    for s, layer in zip(spectra(model), [m for m in model.backbone.modules() if hasattr(m, "svfit")]):
        assert torch.equal(s.sigma.detach(), s.sigma0)
        rebuilt = (s.U * s.sigma0) @ s.Vh
        assert (rebuilt - layer.weight).abs().max() <= 1e-5


def test_training_changes_only_sigma_and_merge_matches_unmerged():
    model = unet_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    derived = {id(s): (s.U.clone(), s.Vh.clone(), s.sigma0.clone()) for s in spectra(model)}
    train(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".svfit.spectra.all.sigma") for k in changed)
    for s in spectra(model):
        assert all(torch.equal(a, b) for a, b in zip(derived[id(s)], (s.U, s.Vh, s.sigma0))), "factors frozen"
    expected = run(model)
    assert not torch.allclose(expected, pristine())
    with model.disabled():
        assert torch.equal(run(model), pristine()), "disabled() is the pristine backbone after training"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.merge()
    torch.testing.assert_close(run(model), expected, atol=1e-4, rtol=0)
    model.unmerge()  # subtracts the delta again: W within fp32 rounding, not bit for bit
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


def test_merged_weight_is_w_plus_u_diag_shift_vt():
    model = unet_model(r=6)
    train(model, steps=2)
    layer = next(m for m in model.backbone.modules() if hasattr(m, "svfit"))
    s = layer.svfit.spectra["all"]
    w = layer.weight.detach().clone()
    expected = w.double() + (s.U.double() * (s.sigma - s.sigma0).double()) @ s.Vh.double()
    model.merge()
    torch.testing.assert_close(layer.weight.double(), expected, atol=1e-6, rtol=0)
    unloaded = model.merge_and_unload()
    assert not [k for k in unloaded.state_dict() if "svfit" in k]


# -- adapter file ------------------------------------------------------------------------------------------


def test_adapter_file_holds_only_sigma_and_reloads_exactly(tmp_path):
    model = unet_model()
    train(model)
    expected = run(model)
    size = save_adapter(model, tmp_path / "svfit.safetensors")
    tensors, header = read_adapter(tmp_path / "svfit.safetensors")
    assert header["method"] == {"name": "svfit", "config": model.method.config()}
    assert tensors and all(k.endswith(".svfit.spectra.all.sigma") for k in tensors), "no U, V or sigma0 in the file"
    numbers = sum(t.numel() for t in tensors.values())
    assert numbers == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert size < 4 * numbers + 16_000  # sigma (fp32) plus the JSON header
    torch.manual_seed(0)
    fresh = adapter_from_file(tiny_unet(), tmp_path / "svfit.safetensors")  # U, V, sigma0 recomputed here
    assert torch.equal(run(fresh), expected)


# -- convolutions ------------------------------------------------------------------------------------------


def test_conv2d_targets_identity_merge_and_the_delta_is_a_conv_with_the_delta_kernel():
    model = unet_model(targets=CONVS)
    convs = [m for m in model.backbone.modules() if hasattr(m, "svfit")]
    assert convs and all(isinstance(m, nn.Conv2d) for m in convs)
    assert any(m.stride == (2, 2) for m in convs) and all(m.kernel_size == (3, 3) for m in convs)
    count = sum(min(m.out_channels, m.in_channels * 9) for m in convs)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert torch.equal(run(model), pristine())
    train(model)
    conv = next(m for m in convs if m.stride == (2, 2))
    piece = conv.svfit.spectra["all"]
    x = torch.randn(2, conv.in_channels, 8, 8)
    delta = piece.delta_weight().float().view(conv.weight.shape)
    with torch.no_grad():
        torch.testing.assert_close(piece(x), F.conv2d(x, delta, None, conv.stride, conv.padding), atol=1e-5, rtol=0)
    expected = run(model)
    model.merge()
    torch.testing.assert_close(run(model), expected, atol=1e-4, rtol=0)


def test_grouped_convs_and_non_linear_targets_are_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, groups=8)
            self.norm = nn.LayerNorm(8)

    with pytest.raises(NotSupported, match="ungrouped"):
        create_method("svfit", targets=("dw",)).apply(Net())
    with pytest.raises(NotSupported, match="supports nn.Linear and nn.Conv2d"):
        create_method("svfit", targets=("norm",)).apply(Net())
    with pytest.raises(NotSupported, match="'nope' matches no module"):
        create_method("svfit", targets=("dw", "nope")).apply(Net())


# -- ranks by energy -----------------------------------------------------------------------------------------


def known_spectrum(values: list[float], rows: int = 7, cols: int = 5) -> torch.Tensor:
    """A rows x cols matrix with exactly these singular values (random orthonormal factors)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize(
    ("energy", "of", "r"),
    [  # sigma = 4, 2, 1, 1, 0 -> sigma^2 shares 16/22, 20/22, 21/22, 1, 1; sigma shares 4/8, 6/8, 7/8, 1, 1
        (0.70, "sq", 1),
        (0.90, "sq", 2),
        (0.95, "sq", 3),
        (0.99, "sq", 4),
        (1.00, "sq", 4),
        (0.49, "sum", 1),
        (0.74, "sum", 2),
        (0.90, "sum", 4),
    ],
)
def test_energy_threshold_picks_the_smallest_rank_that_reaches_it(energy, of, r):
    values = [4.0, 2.0, 1.0, 1.0, 0.0]
    weight = known_spectrum(values)
    s = torch.linalg.svdvals(weight)
    assert energy_rank(torch.tensor(values), energy, of) == r
    exact = {"sq": (16 / 22, 20 / 22), "sum": (0.5, 0.75)}[of]  # reaching a share exactly is enough
    assert [energy_rank(torch.tensor(values), t, of) for t in exact] == [1, 2]
    net = nn.Sequential(nn.Linear(5, 7, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(weight.float())
    create_method("svfit", energy=energy, energy_of=of, targets=("0",)).apply(net)
    piece = net[0].svfit.spectra["all"]
    assert piece.rank == r and svfit_ranks(net) == {"0.svfit.spectra.all": r}
    torch.testing.assert_close(piece.sigma0, s[:r].float(), atol=1e-5, rtol=0)


def test_energy_with_r_caps_and_paper_preset_and_bad_options():
    net = nn.Sequential(nn.Linear(5, 7, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(known_spectrum([4.0, 2.0, 1.0, 1.0, 0.0]).float())
    create_method("svfit", energy=1.0, r=2, targets=("0",)).apply(net)
    assert net[0].svfit.spectra["all"].rank == 2
    paper = create_method("svfit", preset="paper")
    assert (paper.energy, paper.energy_of, paper.r) == (0.99, "sq", None)
    assert energy_rank(torch.zeros(3), 0.99) == 1
    with pytest.raises(ValueError, match="energy is a share"):
        create_method("svfit", energy=1.5)
    with pytest.raises(ValueError, match="energy_of"):
        create_method("svfit", energy_of="abs")
    with pytest.raises(ValueError, match="bad SVFit target"):
        create_method("svfit", targets=("attn.qkv[x]",)).apply(nn.Sequential(nn.Linear(5, 7)))


def test_energy_ranks_on_the_tiny_unet_are_per_matrix():
    model = unet_model(energy=0.9)
    ranks = svfit_ranks(model.backbone)
    full = {n: min(s.U.shape[0], s.Vh.shape[1]) for n, s in zip(ranks, spectra(model))}
    assert all(1 <= ranks[n] < full[n] for n in ranks), "90% of a random matrix's energy needs less than all of it"
    assert torch.equal(run(model), pristine())


# -- fused qkv parts on a token backbone ----------------------------------------------------------------------


def test_qkv_parts_have_their_own_spectra_and_merge_leaves_k_alone():
    from mmpeft.backbones import TimmViT

    torch.manual_seed(0)
    model = PeftModel(TimmViT("test_vit", img_size=32), "svfit", num_classes=3)
    qkv = model.backbone.blocks[0].attn.qkv
    d = qkv.in_features
    assert set(qkv.svfit.spectra) == {"q", "v"}
    q = qkv.svfit.spectra["q"]
    torch.testing.assert_close(q.sigma0, torch.linalg.svdvals(qkv.weight[:d].double()).float(), atol=1e-5, rtol=0)
    with torch.no_grad():
        for s in qkv.svfit.spectra.values():
            s.sigma.mul_(1.1)
    w = qkv.weight.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        expected = model(x)
        model.merge()
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
    assert torch.equal(qkv.weight[d : 2 * d], w[d : 2 * d]), "k rows untouched"
    torch.testing.assert_close(qkv.weight[:d], w[:d] * 1.1, atol=1e-5, rtol=0)  # all of q's spectrum scaled


def test_svfit_is_registered_with_its_declarations():
    assert SVFit.name == "svfit" and SVFit.mergeable and SVFit.identity_at_init and not SVFit.needs_tokens
    import mmpeft.methods.svfit as module

    assert "2409.05926" in module.__doc__ and "no official code" in module.__doc__.lower()


def test_tiny_unet_full_spectrum_count():
    """The (32, 64) test UNet's 48 attention linears at full spectrum: 2,688 singular values (LoRA r=4: 23,040)."""
    from mmpeft.backbones import create_backbone
    from mmpeft.core.report import parameter_report

    assert parameter_report(PeftModel(create_backbone("tiny_sd_unet"), "svfit")).trainable == 2_688


# -- the shipped configs (issue 22 item 9) ----------------------------------------------------------------------

SVFIT_CONFIGS = ["configs/diffusion/svfit.yaml", "configs/diffusion/svfit_dit.yaml", "configs/vtab/svfit.yaml",
                 "configs/fgvc/svfit.yaml"]  # fmt: skip
READING = "the smallest r whose top-r squared singular values hold 99% of sum(sigma^2)"


@pytest.mark.parametrize("config", SVFIT_CONFIGS)
def test_shipped_svfit_configs_train_the_papers_top_singular_values(config):
    """The configs used to train the full spectrum; they ship the paper's selection (`preset: paper`: energy 0.99
    on sigma^2, per matrix) and say in their header which reading of the paper's "99%" that is."""
    import pathlib

    import yaml

    from mmpeft.core.method import method_from_spec

    path = pathlib.Path(__file__).resolve().parents[1] / config
    text = path.read_text()
    method = method_from_spec(yaml.safe_load(text)["model"]["init_args"]["method"])
    assert (method.name, method.r, method.energy, method.energy_of) == ("svfit", None, 0.99, "sq")
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert READING in header and "over 99% of the matrix's information" in header


def test_the_diffusion_config_keeps_fewer_than_the_full_spectrum_on_the_tiny_unet():
    """The shipped SD config's method on the tiny SD UNet (random weights): each matrix keeps the energy rank of
    its own spectrum, 99% of sum(sigma^2), which is below the full spectrum for these weights."""
    import pathlib

    import yaml

    from mmpeft.backbones import DiffusersUNet
    from mmpeft.core.method import method_from_spec

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "configs/diffusion/svfit.yaml").read_text())["model"]["init_args"]["method"]
    model = PeftModel(DiffusersUNet(config="tiny_sd_unet"), method_from_spec(spec))
    ranks = svfit_ranks(model.backbone)
    layers = {n: m for n, m in model.backbone.named_modules() if hasattr(m, "svfit")}
    assert len(ranks) == len(layers) == 48
    for name, layer in layers.items():
        sigma = torch.linalg.svdvals(layer.weight.detach().double())
        assert ranks[f"{name}.svfit.spectra.all"] == energy_rank(sigma, 0.99, "sq")
    full = sum(min(m.in_features, m.out_features) for m in layers.values())
    assert full == 2_688 and sum(ranks.values()) < full


# -- the two routes of an adapted nn.Linear ---------------------------------------------------------------


@pytest.mark.parametrize("target, rank", [("2[q,v]", None), ("2", None), ("2", 3), ("2[q,v]", 2)])
@pytest.mark.parametrize("autocast", [False, True])
def test_fold_and_delta_routes_agree_on_outputs_and_gradients(monkeypatch, target, rank, autocast):
    """The folded product x (W + U diag(sigma - sigma0) V^T)^T and the delta beside it, W x + U ((sigma - sigma0)
    ⊙ V^T x), are one function: outputs, x's gradient and sigma's agree (fp32 to rounding; bf16 autocast to its
    precision), with sigma moved off sigma0. At sigma = sigma0 the fold route is the frozen layer bit for bit."""
    import mmpeft.methods.svfit as svfit_module

    torch.manual_seed(0)
    layer = nn.Linear(24, 48).requires_grad_(False)  # frozen, as the method leaves it (a trained W never folds)
    method = SVFit(r=rank, targets=(target.replace("2", "layer", 1),))
    net = nn.Module()
    net.layer = layer
    method.inject(net)
    piece = layer.svfit
    x = torch.randn(4, 10, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = F.linear(x, layer.weight, layer.bias)
    monkeypatch.setattr(svfit_module, "fold_is_cheaper", lambda *a: True)
    xi = x.clone().requires_grad_(True)  # the autograd route, as in training
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(layer(xi).detach(), plain), "fold route at init is the frozen layer"
    with torch.no_grad():
        for spectrum in piece.spectra.values():
            spectrum.sigma.add_(torch.randn_like(spectrum.sigma) * 0.3)
    results = {}
    for route in ("fold", "delta"):
        monkeypatch.setattr(svfit_module, "fold_is_cheaper", lambda *a, route=route: route == "fold")
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(xi)
        assert ("_FoldedSpectra" in type(out.grad_fn).__name__) == (route == "fold")
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
        results[route] = (out.float(), xi.grad.clone(), [s.sigma.grad.clone() for s in piece.spectra.values()])
        for spectrum in piece.spectra.values():
            spectrum.sigma.grad = None
    tol = {"atol": 5e-2, "rtol": 5e-2} if autocast else {"atol": 1e-4, "rtol": 1e-4}
    (out_f, gx_f, gs_f), (out_d, gx_d, gs_d) = results["fold"], results["delta"]
    torch.testing.assert_close(out_f, out_d, **tol)
    torch.testing.assert_close(gx_f, gx_d, **tol)
    for a, b in zip(gs_f, gs_d):
        torch.testing.assert_close(a, b, **({"atol": 0.5, "rtol": 5e-2} if autocast else tol))
    assert out_f.dtype == out_d.dtype


def test_the_fold_route_is_taken_where_it_is_cheaper_and_keeps_less_for_backward():
    """On ViT-B/16's q and v thirds at batch 8 (1,576 tokens) the full spectrum folds (3 d^3 + N d^2 against
    4 N d^2 multiply-adds per third), and a rank-8 SVFit too (its fold costs 2 d^2 r against 2 N r d for the
    delta's down / up transposes); one image of 10 tokens runs the delta. Folded, backward keeps one [N, d] input
    per layer instead of the two [N, r] projections, the full spectrum's 2 [N, d]."""
    from mmpeft.methods.svfit import fold_is_cheaper

    for rank in (None, 8):
        layer = nn.Linear(768, 2304, device="meta")
        net = nn.Module()
        net.qkv = layer
        SVFit(r=rank, targets=("qkv[q,v]",)).inject(net)
        assert fold_is_cheaper(layer.svfit, 1576, True, True)
        assert not fold_is_cheaper(layer.svfit, 10, True, True)

    def kept_bytes(route: str) -> int:
        torch.manual_seed(0)
        net = nn.Module()
        net.qkv = nn.Linear(32, 96).requires_grad_(False)
        SVFit(targets=("qkv[q,v]",)).inject(net)  # full spectrum: r = 32 per third
        own = {t.data_ptr() for t in [*net.parameters(), *net.buffers()]}
        kept = {}

        def pack(t):
            if t.data_ptr() not in own:
                kept[t.data_ptr()] = t.numel() * t.element_size()
            return t

        x = torch.randn(64, 32, requires_grad=True)
        with pytest.MonkeyPatch.context() as patch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            patch.setattr("mmpeft.methods.svfit.fold_is_cheaper", lambda *a: route == "fold")
            net.qkv(x).sum().backward()
        return sum(kept.values())

    assert kept_bytes("fold") == 64 * 32 * 4  # x once
    assert kept_bytes("delta") >= 2 * 64 * 32 * 4  # V^T x for q and for v
