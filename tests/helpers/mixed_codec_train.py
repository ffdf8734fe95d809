"""Test helper: train a small bf16 MLP with a Checkpointer (heavy every 4 steps, light every 2,
async saves) on a store with per-region codecs.

argv: OUT.pt, then REGION=CODEC pairs (quorum 2 of 3, else every region); $MIXED_CODEC_DELTA=1
turns delta on. Prints "step" after each step so a test can SIGKILL it mid-save; writes the final
model and optimizer state to OUT.pt.
"""

import os
import sys

import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import Checkpointer, CheckpointSchedule, CheckpointStore, EveryNSteps, seed_everything

out, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
store = CheckpointStore(
    regions=[r for r, _ in pairs],
    region_codecs={r: c for r, c in pairs},
    write_quorum=len(pairs) if len(pairs) < 3 else 2,
    chunk_bytes=192 * 1024,
    delta=os.environ.get("MIXED_CODEC_DELTA") == "1",
)
schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4), EveryNSteps(every=2, tier="light")])
seed_everything(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8)
).to(torch.bfloat16)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(320, 64, generator=g).to(torch.bfloat16), torch.randint(0, 8, (320,), generator=g))
loader = StatefulDataLoader(data, batch_size=16, shuffle=True)
with Checkpointer(store, "mixed-run", model=model, optimizer=optimizer, data=loader, schedule=schedule, seed=0) as ckpt:
    for _epoch in range(ckpt.epoch, 2):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ckpt.step()
            print("step", flush=True)
        ckpt.end_epoch()
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out)
print("done", flush=True)
