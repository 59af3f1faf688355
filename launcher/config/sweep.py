"""A recipe's `sweep:` section expanded into trials, each validated as an ordinary recipe. Torch-free (planning side).

Configurations are the grid's combinations (keys in the order written, the last varying fastest) times the random
draws (`random.trials` of them, from `random.seed`: the same sweep always draws the same values); every
configuration trains once per seed. A trial is the recipe plus overrides: its configuration's values,
`optim.seed=<seed>`, `sweep=null`, and its place (`output.root=<sweep dir>/trials`, `output.name=<trial>`). So a
trial is loaded, planned, run, resumed and requeued exactly like a run of a plain recipe, and a bad value fails
at plan time as the same RecipeError, named with its trial.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from launcher.config.recipe import LoadedRecipe, Problem, RecipeError, load_recipe
from launcher.config.schema import SweepConfig

TRIALS_DIR = "trials"
SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Trial:
    """One run of a sweep."""

    name: str
    """`c<config>-s<seed>`: its run directory under SWEEP_DIR/trials/."""

    config: int
    """Index of its configuration (trials of one configuration differ only by seed)."""

    seed: int
    values: dict[str, Any] = field(default_factory=dict)
    """Key path -> value of its configuration."""

    def overrides(self, sweep_dir: Path) -> list[str]:
        """The `key.path=value` overrides that make the recipe this trial (values as JSON, which YAML reads back)."""
        return [*(f"{key}={json.dumps(value)}" for key, value in self.values.items()), f"optim.seed={self.seed}",
                "sweep=null", f"output.root={json.dumps(str(sweep_dir / TRIALS_DIR))}", f"output.name={self.name}"]


@dataclass
class Sweep:
    """A sweep recipe with its trials, every one validated."""

    loaded: LoadedRecipe
    """The sweep recipe itself (with its `sweep:` section)."""

    trials: list[Trial]
    configs: list[dict[str, Any]]
    """Each configuration's values, by index."""

    @property
    def config(self) -> SweepConfig:
        assert self.loaded.recipe.sweep is not None
        return self.loaded.recipe.sweep

    def fingerprint(self) -> str:
        """Same sweep, same fingerprint: the recipe (less its output place) and every trial. Submitting a sweep
        whose directory holds the same fingerprint continues that directory instead of starting a new one."""
        recipe = self.loaded.recipe.model_dump(mode="json", exclude={"output"})
        trials = [(t.name, t.values, t.seed) for t in self.trials]
        return hashlib.sha256(json.dumps([recipe, trials], sort_keys=True, default=str).encode()).hexdigest()[:16]

    def load_trial(self, trial: Trial, sweep_dir: Path) -> LoadedRecipe:
        return load_recipe(self.loaded.source, [*self.loaded.overrides, *trial.overrides(sweep_dir)])


def seeds_of(config: SweepConfig, base_seed: int) -> list[int]:
    return list(config.seeds) if isinstance(config.seeds, list) else [base_seed + i for i in range(config.seeds)]


def draw(space: dict[str, dict[str, list[Any]]], rng: random.Random) -> dict[str, Any]:
    """One random configuration. loguniform draws uniformly in log space; int includes both ends."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        kind, bounds = next(iter(spec.items()))
        if kind == "choice":
            values[key] = rng.choice(bounds)
        elif kind == "uniform":
            values[key] = rng.uniform(bounds[0], bounds[1])
        elif kind == "loguniform":
            values[key] = math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))
        else:
            values[key] = rng.randint(bounds[0], bounds[1])
    return values


def configurations(config: SweepConfig) -> list[dict[str, Any]]:
    grid = [dict(zip(config.grid, combo)) for combo in itertools.product(*config.grid.values())] or [{}]
    if config.random is None:
        return grid
    rng = random.Random(config.random.seed)
    draws = [draw(config.random.space, rng) for _ in range(config.random.trials)]
    return [{**point, **drawn} for point in grid for drawn in draws]


MAX_TRIALS = 10_000


def expand(loaded: LoadedRecipe) -> tuple[list[dict[str, Any]], list[Trial]]:
    config = loaded.recipe.sweep
    assert config is not None
    configs = configurations(config)
    seeds = seeds_of(config, loaded.recipe.optim.seed)
    if len(configs) * len(seeds) > MAX_TRIALS:
        raise RecipeError([Problem("sweep", f"{len(configs)} configurations x {len(seeds)} seeds = "
                                   f"{len(configs) * len(seeds)} trials, more than {MAX_TRIALS}", loaded.locate("sweep"),
                                   "shrink the grid or random.trials")], source=str(loaded.source))
    width = len(str(len(configs) - 1))
    trials = [Trial(f"c{i:0{width}d}-s{seed}", i, seed, values) for i, values in enumerate(configs) for seed in seeds]
    return configs, trials


def load_sweep(path: str | Path, overrides: Sequence[str] = (), sweep_dir: Path | None = None) -> Sweep:
    """The sweep recipe at `path` and its trials, each loaded and validated as the recipe it runs: every problem of
    every trial is raised at once, each named with its trial (`c1-s0: optim.lr ...`)."""
    loaded = load_recipe(path, overrides)
    if loaded.recipe.sweep is None:
        raise RecipeError([Problem("sweep", "this recipe has no sweep: section", None,
                                   "add sweep: {seeds: 3, grid: {optim.lr: [1e-4, 3e-4]}}")], source=str(loaded.source))
    configs, trials = expand(loaded)
    sweep = Sweep(loaded, trials, configs)
    where = sweep_dir or Path(loaded.recipe.output.root).resolve() / (loaded.recipe.output.name or loaded.recipe.name)
    problems: list[Problem] = []
    checked: set[int] = set()
    for trial in trials:
        if trial.config in checked:  # seeds only change optim.seed, which the first seed's trial has checked
            continue
        checked.add(trial.config)
        try:
            sweep.load_trial(trial, where)
        except RecipeError as err:
            problems.extend(Problem(f"trial {trial.name}: {p.path}", p.message, p.location, p.hint)
                            for p in err.problems)
    if problems:
        raise RecipeError(problems, source=f"{loaded.source} (sweep)")
    return sweep
