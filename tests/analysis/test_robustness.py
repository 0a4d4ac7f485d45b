"""FGSM / PGD on the fitted micro model and the real digits."""
import pytest
import torch

from stm_dist.analysis.options import AnalysisError, parse_eps
from stm_dist.analysis.robustness import pgd, run_robustness
from stm_dist.analysis.runner import Normalized, ValImages
from stm_dist.data.pil_reader import val_transform


def pixels(digits_shards, n, batch=8):
    from torchvision import transforms as T

    tf = T.Compose(val_transform(32, 0.875).transforms[:-1])
    return ValImages(digits_shards, lambda img, i: tf(img), batch=batch, limit=n)


def test_parse_eps_takes_fractions_and_rejects_bad_values():
    assert parse_eps("1/255") == pytest.approx(1 / 255) and parse_eps("0") == 0.0 and parse_eps("0.01") == 0.01
    for bad in ("abc", "1/0", "-1/255", "2"):
        with pytest.raises(AnalysisError, match="--eps"):
            parse_eps(bad)


def test_eps_zero_is_clean_and_pgd_never_rises_with_eps(fitted, digits_shards):
    model = Normalized(fitted[0]).requires_grad_(False)
    eps = [0, 1 / 255, 4 / 255, 16 / 255]
    r = run_robustness(model, pixels(digits_shards, 24), eps, steps=3)
    assert r["num_images"] == 24 and r["clean_acc1"] > 30
    by = {(a["attack"], a["eps"]): a for a in r["attacks"]}
    for attack in ("fgsm", "pgd"):
        assert by[(attack, 0.0)]["acc1"] == by[(attack, 0.0)]["acc1_accumulated"] == r["clean_acc1"]
    pgd_acc = [by[("pgd", e)]["acc1_accumulated"] for e in sorted(eps)]
    assert all(b <= a for a, b in zip(pgd_acc, pgd_acc[1:])), pgd_acc
    # the attack really attacks: at 16/255 the fitted model loses most of its accuracy
    assert by[("pgd", 16 / 255)]["acc1"] < r["clean_acc1"] / 2
    assert by[("pgd", 16 / 255)]["acc1_accumulated"] <= by[("pgd", 16 / 255)]["acc1"]


def test_headline_is_per_eps_whatever_else_was_run(fitted, digits_shards):
    """`acc1` at eps is the attack at that eps alone: the same number whichever smaller budgets
    were run beside it, and equal to counting the attacked images directly. The accumulated
    number (clean and every budget <= eps) is kept under its own name and does depend on them."""
    from stm_dist.analysis.robustness import fgsm

    model = Normalized(fitted[0]).requires_grad_(False)
    eps = 8 / 255
    short = run_robustness(model, pixels(digits_shards, 8), [0, eps], steps=1)
    long = run_robustness(model, pixels(digits_shards, 8), [0, 2 / 255, eps], steps=1)
    at = {name: {(a["attack"], a["eps"]): a for a in r["attacks"]} for name, r in (("short", short), ("long", long))}
    for attack in ("fgsm", "pgd"):
        assert at["short"][(attack, eps)]["acc1"] == at["long"][(attack, eps)]["acc1"]
        assert at["long"][(attack, eps)]["acc1_accumulated"] <= at["short"][(attack, eps)]["acc1_accumulated"]
    correct = 0
    for _, _, x, y in pixels(digits_shards, 8):
        adv = fgsm(model, x, y, eps)
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == y).sum())
    assert at["long"][("fgsm", eps)]["acc1"] == pytest.approx(100 * correct / 8)
    assert "acc1_single" not in at["long"][("fgsm", eps)]
    assert "budget <= eps" in long["definitions"]["acc1_accumulated"]
    assert "alone" in long["definitions"]["acc1"]


def test_pgd_stays_in_the_ball_and_the_pixel_range_and_is_seeded(fitted, digits_shards):
    model = Normalized(fitted[0]).requires_grad_(False)
    _, idx, x, y = next(iter(pixels(digits_shards, 6, batch=6)))
    eps = 8 / 255
    a = pgd(model, x, y, eps, steps=2, step_size=eps / 4, seeds=list(range(6)))
    assert float((a - x).abs().max()) <= eps + 1e-6 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, pgd(model, x, y, eps, steps=2, step_size=eps / 4, seeds=list(range(6))))
    assert not torch.equal(a, pgd(model, x, y, eps, steps=2, step_size=eps / 4, seeds=list(range(1, 7))))
