"""Full fine-tuning: every backbone tensor (beyond those the task owns, which every method trains)."""

from tests.method_counts import task_owned_count


def expected(model) -> int:
    return sum(p.numel() for p in model.backbone.parameters()) - task_owned_count(model.backbone)
