"""The README's quick start: Neumann on MNIST-1D (generated offline) with a small MLP."""

import torch
from mnist1d.data import get_dataset_args, make_dataset

from neumann_optimizer import Neumann

data = make_dataset(get_dataset_args())  # MNIST-1D, generated locally: nothing is downloaded
x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
xt, yt = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])
model = torch.nn.Sequential(torch.nn.Linear(40, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=128, shuffle=True)
opt = Neumann(model.parameters(), lr=0.3, steps_per_epoch=len(loader))
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40 * len(loader))
for _ in range(40):
    for xb, yb in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        sched.step()
opt.eval()  # evaluate at the weights w - mu m; opt.train() switches back bit for bit
print(f"test accuracy: {(model(xt).argmax(1) == yt).float().mean():.3f}")
