"""Prompt fidelity from classifier probabilities: the match probability against Monte Carlo over
the factorised readings it assumes, the binary check, and hard readings."""

import pytest
import torch

from tiltgen.world import BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, SIZES, parse_caption, satisfied
from tiltgen.world.fidelity import Reading, SeenShape, binary_check, match_probability, read_images


def random_probs(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sharp = lambda *shape: (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).softmax(-1)  # noqa: E731
    return {"occupied": torch.rand(n, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05,
            "shape": sharp(n, 5, len(SHAPES)), "colour": sharp(n, 5, len(COLOUR_NAMES)),
            "size": sharp(n, 5, len(SIZES)), "background": sharp(n, len(BACKGROUND_NAMES))}


def sample_readings(probs, i: int, k: int, g: torch.Generator) -> list[Reading]:
    occ = torch.rand(k, 5, generator=g, dtype=torch.float64) < probs["occupied"][i]
    draw = {h: torch.multinomial(probs[h][i], k, replacement=True, generator=g).T for h in ("shape", "colour", "size")}
    bg = torch.multinomial(probs["background"][i], k, replacement=True, generator=g)
    out = []
    for j in range(k):
        shapes = tuple(SeenShape(SHAPES[int(draw["shape"][j, p])], COLOUR_NAMES[int(draw["colour"][j, p])],
                                 SIZES[int(draw["size"][j, p])], POSITIONS[p]) for p in range(5) if occ[j, p])
        out.append(Reading(shapes, BACKGROUND_NAMES[int(bg[j])]))
    return out


@pytest.mark.parametrize("prompt", ["a red shape", "a large circle on the left on a white background", "two shapes",
                                    "a red shape and a blue circle", "a red shape and a red square at the top",
                                    "on a navy background", ""])
def test_match_probability_equals_the_probability_of_a_matching_reading(prompt):
    probs = random_probs(3, seed=len(prompt))
    spec = parse_caption(prompt)
    exact = match_probability(probs, spec)
    g = torch.Generator().manual_seed(0)
    k = 6000
    for i in range(3):
        readings = sample_readings(probs, i, k, g)
        # a reading matches when it has exactly the caption's objects (two-shape scenes: edges only)
        def ok(r):
            if spec.objects and len(spec.objects) == 2 and any(s.position == "centre" for s in r.shapes):
                return False
            return all(satisfied(spec, r).values())
        empirical = sum(ok(r) for r in readings) / k
        assert abs(empirical - float(exact[i])) < 4 * (max(empirical, 1e-3) / k) ** 0.5 + 2e-3, (prompt, i)


def test_match_probability_is_differentiable():
    probs = {k: v.clone().requires_grad_(True) for k, v in random_probs(2, 1).items()}
    p = match_probability(probs, parse_caption("a red shape and a blue square"))
    p.sum().backward()
    assert probs["colour"].grad.abs().sum() > 0 and probs["occupied"].grad.abs().sum() > 0


def test_hard_readings_and_binary_check():
    probs = {"occupied": torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.1]]),
             "shape": torch.eye(5)[[0, 1, 0, 0, 0]].unsqueeze(0), "colour": torch.eye(7)[[0, 5, 0, 0, 0]].unsqueeze(0),
             "size": torch.eye(2)[[1, 0, 0, 0, 0]].unsqueeze(0), "background": torch.eye(4)[[1]]}
    (reading,) = read_images(probs)
    assert reading == Reading((SeenShape("circle", "red", "large", "left"), SeenShape("square", "blue", "small",
                                                                                        "right")), "white")
    prompts = ["a red shape and a blue shape", "two shapes", "a red shape", "a blue shape and a blue shape",
               "a green circle and a blue square", ""]
    assert binary_check([reading] * len(prompts), prompts) == [True, True, False, False, False, True]
