"""Full fine-tuning: every backbone tensor."""


def expected(model) -> int:
    return sum(p.numel() for p in model.backbone.parameters())
