"""torch.compile on mmpeft's CPU training step (issue 29, item 5): ViT-B/16, 224 px, batch 8, 2 threads.

    python experiments/compile/compile_step.py floor eager
    python experiments/compile/compile_step.py lora compiled

One process per row (compiled code and caches do not leak into the eager row); prints the first step's seconds
(compilation included), the median of 4 further steps, and dynamo's graph-break count for the forward."""

import argparse
import json
import statistics
import sys
import time

import torch

from mmpeft.core.model import PeftModel
from mmpeft.lab.bench_worker import Floor, bench_backbone
from mmpeft.tasks.step import optimizer_step

torch.set_num_threads(2)
row, mode = sys.argv[1], sys.argv[2]
torch._dynamo.config.capture_scalar_outputs = True  # the forward context's seed draw (`.item()`) stays in the graph
spec = argparse.Namespace(backbone="vit_base_patch16_224", img_size=224, in_chans=3, backbone_options="{}",
                          device="cpu")  # fmt: skip
torch.manual_seed(0)
backbone = bench_backbone(spec)
model = PeftModel(backbone, Floor() if row == "floor" else "lora", num_classes=100)
if row == "floor":
    model.head.requires_grad_(False)
model.train()
x, y = backbone.example_batch(8, torch.Generator().manual_seed(0), 100)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
forward = torch.compile(model) if mode == "compiled" else model


def step() -> float:
    loss = backbone.example_loss(forward(x), y)
    optimizer_step(loss, optimizer)
    return float(loss)


start = time.perf_counter()
step()
first = time.perf_counter() - start
times = []
for _ in range(4):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
breaks = torch._dynamo.explain(model)(x).graph_break_count if mode == "compiled" else None
step_ms = round(1000 * statistics.median(times), 1)
print(json.dumps({"row": row, "mode": mode, "first_s": round(first, 1), "step_ms": step_ms, "graph_breaks": breaks}))
