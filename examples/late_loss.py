"""Does Neumann keep its best model to the end of a run? The README quickstart's loop (MNIST-1D 4k, MLP, batch 100,
cosine over 60 epochs) at lr 0.05 and 0.2, with the default and with the paper's repulsive_weight=1e-5; test
accuracy at the evaluation weights every 5 epochs, best vs final.  python examples/late_loss.py
"""

import torch
from mnist1d.data import get_dataset_args, make_dataset

from neumann_optimizer import Neumann

data = make_dataset(get_dataset_args())
x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
xt, yt = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])
for lr in (0.05, 0.2):
    for kw in ({}, {"repulsive_weight": 1e-5}):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=100, shuffle=True)
        opt = Neumann(model.parameters(), lr=lr, steps_per_epoch=len(loader), **kw)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60 * len(loader))
        accs = []
        for ep in range(60):
            for xb, yb in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                sched.step()
            if (ep + 1) % 5 == 0:
                with opt.evaluation(), torch.no_grad():
                    accs.append(round(100 * (model(xt).argmax(1) == yt).float().mean().item(), 1))
        print(f"lr {lr} {kw or 'default'}: acc every 5 epochs {accs}; best {max(accs)} final {accs[-1]}", flush=True)
