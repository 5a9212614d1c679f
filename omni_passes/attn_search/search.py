"""Search strategies for the compressed-layer pattern, behind one interface.

``make_strategy(name, **options).search(objective, num_layers, size, rng) -> SearchResult``
returns ``size`` layer indices minimising ``objective(pattern)``.

- ``greedy``: grow the pattern one layer at a time, each time adding the layer whose addition
  costs least. ``size · num_layers`` evaluations at most; layers interact only through the
  objective, which greedy follows step by step.
- ``genetic``: a population of patterns of exactly ``size`` layers; tournament selection,
  crossover (a random ``size``-subset of the parents' union), mutation (swap a layer in the
  pattern for one outside), elitism. Seeded with the greedy-of-one ranking's best ``size``
  layers so it never does worse than the cheapest single-layer guess.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

Objective = Callable[[list[int]], float]


@dataclass
class SearchResult:
    pattern: list[int]
    value: float
    trace: list[dict] = field(default_factory=list)  # what the search did, step by step


class GreedySearch:
    name = "greedy"

    def search(self, objective: Objective, num_layers: int, size: int, rng: random.Random) -> SearchResult:
        chosen: list[int] = []
        trace = []
        value = objective([])
        while len(chosen) < size:
            scores = {layer: objective(chosen + [layer]) for layer in range(num_layers) if layer not in chosen}
            best = min(scores, key=lambda layer: (scores[layer], layer))
            chosen.append(best)
            value = scores[best]
            trace.append({"added": best, "value": value, "candidates": {str(k): v for k, v in sorted(scores.items())}})
        return SearchResult(sorted(chosen), value, trace)


class GeneticSearch:
    name = "genetic"

    def __init__(self, population: int = 16, generations: int = 12, mutation: float = 0.5, elite: int = 2):
        if population < 2 or generations < 0 or elite < 0 or elite > population:
            raise ValueError(f"genetic search: bad settings population={population}, generations={generations}, elite={elite}")
        self.population, self.generations, self.mutation, self.elite = population, generations, mutation, elite

    def search(self, objective: Objective, num_layers: int, size: int, rng: random.Random) -> SearchResult:
        if size in (0, num_layers):
            pattern = list(range(size))
            return SearchResult(pattern, objective(pattern))
        singles = sorted(range(num_layers), key=lambda layer: (objective([layer]), layer))
        population = {tuple(sorted(singles[:size]))}
        while len(population) < self.population:
            population.add(tuple(sorted(rng.sample(range(num_layers), size))))
        population = list(population)
        trace = []
        for generation in range(self.generations):
            ranked = sorted(population, key=lambda p: (objective(list(p)), p))
            trace.append({"generation": generation, "best": list(ranked[0]), "value": objective(list(ranked[0]))})
            children = ranked[: self.elite]
            while len(children) < self.population:
                a, b = self._pick(ranked, objective, rng), self._pick(ranked, objective, rng)
                child = rng.sample(sorted(set(a) | set(b)), size)
                if rng.random() < self.mutation:
                    outside = [layer for layer in range(num_layers) if layer not in child]
                    child[rng.randrange(size)] = rng.choice(outside)
                children.append(tuple(sorted(child)))
            population = children
        best = min(population, key=lambda p: (objective(list(p)), p))
        return SearchResult(list(best), objective(list(best)), trace)

    @staticmethod
    def _pick(ranked, objective, rng, contestants: int = 3):
        entrants = rng.sample(ranked, min(contestants, len(ranked)))
        return min(entrants, key=lambda p: (objective(list(p)), p))


STRATEGIES = {"greedy": GreedySearch, "genetic": GeneticSearch}


def make_strategy(name: str, **options):
    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**options)


def random_patterns(num_layers: int, size: int, count: int, rng: random.Random) -> list[list[int]]:
    """``count`` distinct random patterns of ``size`` layers (fewer if fewer exist)."""
    from math import comb

    count = min(count, comb(num_layers, size))
    seen: set[tuple[int, ...]] = set()
    while len(seen) < count:
        seen.add(tuple(sorted(rng.sample(range(num_layers), size))))
    return [list(p) for p in sorted(seen)]


def layers_for_budget(budget: float, num_layers: int) -> int:
    """Number of layers to compress for a budget given as a fraction of the layers."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"--budget is a fraction of the layers in [0, 1], got {budget}")
    return int(round(budget * num_layers))
