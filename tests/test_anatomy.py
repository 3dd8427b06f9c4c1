"""The token anatomy contract: layout, masks, positions, pooling, draws, sites, checkpointing."""

from __future__ import annotations

import pytest
import torch

from mmpeft.backbones import TimmViT
from mmpeft.core.anatomy import SITES, ForwardContext
from mmpeft.core.modules import AdapterModule, PromptTokens
from mmpeft.core.pristine import disabled
from tests.toys import ToyPointTower, ToyTextTower


class InsertPrompts(AdapterModule):
    """A test hook for `before_block[0]`: insert prompts at a fixed index (a VPT-like method)."""

    def __init__(self, n: int, dim: int, at: int | str):
        super().__init__()
        self.prompts, self.at = PromptTokens(n, dim), at

    def forward(self, x, ctx: ForwardContext, index: int):
        at = ctx.span(self.at).start if isinstance(self.at, str) else self.at
        return ctx.insert(x, self.prompts(0, x.shape[0]), "prompts", at)


def test_insert_keeps_layout_positions_mask_and_pool_index_consistent():
    ctx = ForwardContext(
        layout={"cls": slice(0, 1), "patches": slice(1, 5)},
        positions=torch.arange(5.0).view(1, 5, 1).expand(2, 5, 1),
        attn_mask=torch.ones(5, 5, dtype=torch.bool).tril(),
        pool_index=torch.tensor([0, 3]),
    )
    x = torch.arange(5.0).view(1, 5, 1).expand(2, 5, 1)
    out = ctx.insert(x, torch.full((2, 2, 1), -1.0), "prompts", at=1)
    assert out[0, :, 0].tolist() == [0, -1, -1, 1, 2, 3, 4]
    assert ctx.layout == {"cls": slice(0, 1), "prompts": slice(1, 3), "patches": slice(3, 7)}
    assert ctx.positions[0, :, 0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert ctx.pool_index.tolist() == [0, 5]
    assert ctx.attn_mask.shape == (7, 7)
    kept = torch.cat([ctx.attn_mask[:1], ctx.attn_mask[3:]])[:, [0, 3, 4, 5, 6]]
    assert torch.equal(kept, torch.ones(5, 5, dtype=torch.bool).tril()), "the original mask is preserved"
    replaced = ctx.replace(out, "prompts", torch.full((2, 2, 1), 9.0))
    assert replaced[0, :, 0].tolist() == [0, 9, 9, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="already exists"):
        ctx.insert(out, torch.zeros(2, 1, 1), "prompts", at=0)
    with pytest.raises(KeyError, match="no token group 'registers'"):
        ctx.span("registers")


def test_text_tower_prompts_keep_causal_mask_and_eot_pooling():
    torch.manual_seed(0)
    tower = ToyTextTower().eval()
    ids = tower.example_inputs(3, torch.Generator().manual_seed(1))
    plain, plain_ctx = tower.forward_tokens(ids)
    tower.before_block[0].append(InsertPrompts(3, tower.embed_dim, at=1))
    x, ctx = tower.forward_tokens(ids)
    assert x.shape[1] == ids.shape[1] + 3
    assert torch.equal(ctx.pool_index, plain_ctx.pool_index + 3), "EOT index shifts past the prompts"
    assert torch.equal(tower.pool(x, ctx), x[torch.arange(3), ids.argmax(-1) + 3])
    # causality: changing a token after the EOT leaves the pooled feature alone
    later = ids.clone()
    row = int((ids.argmax(-1) < ids.shape[1] - 1).nonzero()[0])
    later[row, ids[row].argmax() + 1] = (later[row, ids[row].argmax() + 1] + 1) % (tower.vocab - 1)
    assert torch.equal(tower(later)[row], tower(ids)[row])
    with tower.disabled():
        assert torch.equal(tower(ids), tower.pool(plain, plain_ctx))


def test_prompts_do_not_change_patch_pooling():
    torch.manual_seed(0)
    vit = TimmViT("vit_base_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2, global_pool="avg").eval()
    vit.before_block[0].append(InsertPrompts(4, 32, at="patches"))
    x, ctx = vit.forward_tokens(torch.randn(2, 3, 32, 32))
    assert x.shape[1] == 1 + 4 + 4 and ctx.layout["prompts"] == slice(1, 5)
    assert torch.equal(vit.pool(x, ctx), vit.fc_norm(x[:, 5:].mean(1)))


def test_positions_are_added_before_every_block():
    torch.manual_seed(0)
    tower = ToyPointTower().eval()
    xyz = tower.example_inputs(2, torch.Generator().manual_seed(0))
    out, ctx = tower.forward_tokens(xyz)
    manual = tower.embed(xyz, ctx2 := ForwardContext())
    for block in tower.blocks:
        manual = block(manual + ctx2.positions, ctx2)
    assert torch.equal(out, tower.norm(manual))


class DrawnMask(AdapterModule):
    """Multiplies by a random channel mask drawn through the context (like MoSA's expert choice)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(dim))
        self.samples = 0

    def forward(self, m, ctx: ForwardContext, x_in=None):
        def sample(g):
            self.samples += 1
            return (torch.rand(m.shape[-1], generator=g) > 0.5).to(m.dtype)

        return m * self.scale * ctx.draw(f"mask{id(self)}", sample)


def test_draws_are_made_once_per_forward_and_reused_by_checkpointing():
    grads, samples = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        tower = ToyTextTower().train()
        hooks = [DrawnMask(tower.embed_dim) for _ in tower.blocks]
        for (_, site), hook in zip(tower.sites("mlp.out"), hooks):
            site.append(hook)
        tower.set_grad_checkpointing(ckpt)
        ids = tower.example_inputs(2, torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        tower(ids).sum().backward()
        grads.append([h.scale.grad.clone() for h in hooks])
        samples.append([h.samples for h in hooks])
    assert samples == [[1, 1], [1, 1]], "recomputation reuses the stored draw"
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_draws_follow_the_global_seed():
    ctx_a, ctx_b = ForwardContext(), ForwardContext()
    torch.manual_seed(4)
    a = ctx_a.draw("k", lambda g: torch.randint(0, 100, (5,), generator=g))
    torch.manual_seed(4)
    b = ctx_b.draw("k", lambda g: torch.randint(0, 100, (5,), generator=g))
    assert torch.equal(a, b)


def test_sites_and_disabled():
    tower = ToyTextTower()
    assert len(list(tower.sites("mlp.branch"))) == tower.depth
    assert set(SITES) == {n.replace("_", ".", 1) for n in tower.blocks[0].sites}
    with pytest.raises(KeyError, match="unknown site"):
        tower.blocks[0].site("mlp.in")
    hook = DrawnMask(tower.embed_dim)
    tower.blocks[0].site("attn.out").append(hook)
    with disabled(tower):
        assert not hook.enabled
    assert hook.enabled
