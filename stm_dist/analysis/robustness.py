"""White-box adversarial robustness: FGSM and PGD-l_inf in pixel space [0, 1], before the
normalisation (the model is wrapped in `Normalized`).

FGSM: x + eps sign(grad). PGD (Madry et al.): a uniform random start in the eps-ball (seeded per
image and eps value), `steps` steps of size `step_size` (default eps / 4) on sign(grad), each projected
back onto the eps-ball and [0, 1]. The loss is the cross-entropy to the label, summed over the
batch so an image's gradient does not depend on its batch.

Per attack and eps:

* `acc1` (the headline): top-1 under the attack run at that eps alone. It does not depend on
  which other budgets were run, so models run with different --eps lists compare at a shared eps.
* `acc1_accumulated`: an image counts only when neither the clean image nor the attack at any
  budget <= eps *in this run's --eps list* fooled it (a smaller ball lies inside the larger one,
  so that is still an attack within eps, and the curve can only fall). Kept for its monotone
  curve, labelled as what it is: its value depends on the eps list.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stm_dist.data.epoch_plan import epoch_seed

from .options import AnalysisError
from .runner import ValImages, gather_per_image, progress

DEFINITIONS = {
    "acc1": "top-1 (%) under the attack at this eps alone (the headline)",
    "acc1_accumulated": "top-1 (%) counting an image only when correct on the clean image and on every attack "
                        "with budget <= eps in this run's eps list (depends on that list)",
}


def _grad_sign(model, x, labels):
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), labels, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g.sign()


def fgsm(model, x, labels, eps: float):
    return (x + eps * _grad_sign(model, x, labels)).clamp(0, 1).detach()


def pgd(model, x, labels, eps: float, steps: int, step_size: float, seeds: list[int]):
    noise = torch.stack([torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(s), dtype=x.dtype)
                         for s in seeds]).to(x.device)
    adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv = adv + step_size * _grad_sign(model, adv, labels)
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1).detach()
    return adv


@torch.no_grad()
def _correct(model, x, labels):
    return (model(x).argmax(1) == labels).cpu().numpy()


def run_robustness(model, data: ValImages, eps_list: list[float], *, steps: int = 10,
                   step_size: float | None = None, seed: int = 0, rank: int = 0) -> dict:
    """`model` takes [0, 1] pixels. Returns clean_acc1 and, per attack and eps, acc1 / acc1_accumulated."""
    if steps < 1:
        raise AnalysisError(f"--pgd-steps must be >= 1, got {steps}")
    eps_sorted = sorted(set(eps_list))
    results = {}
    with progress(data.my_images, "robustness", rank) as bar:
        for b, idx, images, labels in data:
            r = {"clean": _correct(model, images, labels)}
            for k, eps in enumerate(eps_sorted):
                r[("fgsm", k)] = _correct(model, fgsm(model, images, labels, eps), labels)
                seeds = [epoch_seed(seed, round(eps * 1e9), int(i), 0xAD5) for i in idx]
                adv = pgd(model, images, labels, eps, steps, eps / 4 if step_size is None else step_size, seeds)
                r[("pgd", k)] = _correct(model, adv, labels)
            results[b] = r
            bar.update(len(labels))
    cols = gather_per_image(results, data.num_images, "robustness")
    n = data.num_images
    attacks = []
    for name in ("fgsm", "pgd"):
        robust = cols["clean"].copy()
        for k, eps in enumerate(eps_sorted):
            robust &= cols[(name, k)]
            attacks.append({"attack": name, "eps": eps, "acc1": 100.0 * int(cols[(name, k)].sum()) / n,
                            "acc1_accumulated": 100.0 * int(robust.sum()) / n})
    return {"num_images": n, "clean_acc1": 100.0 * int(cols["clean"].sum()) / n, "attacks": attacks,
            "definitions": dict(DEFINITIONS),
            "pgd_steps": steps, "pgd_step_size": "eps/4" if step_size is None else step_size}
