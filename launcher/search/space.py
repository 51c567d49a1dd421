"""A search file: the fixed words, the searched keys and their ranges, and how to search.

    description: learning rate and rank of LoRA on the default data
    base: [recipe=lora, train.max_steps=60, eval.every_steps=10]
    metric: eval_loss              # default: the recipe's eval.metric
    trials: 12                     # trials in all (a resumed search counts those already run)
    parallel: 2                    # trials in flight at once
    sampler: tpe                   # tpe (Bayesian optimisation) or random
    pruner: median                 # median, successive_halving or none
    seed: 0
    enqueue:                       # optional: trials to run first, before the sampler chooses
      - {train.lr: 2.0e-4, peft.r: 8, train.scheduler: linear}
    space:
      train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      peft.r: {type: int, low: 4, high: 32, step: 4}
      train.scheduler: {type: choice, values: [linear, cosine]}

Every key of `space` is a recipe key; the file is checked against the recipe schema (with each
range's low end and first choice) before anything starts, so a typo costs no trial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import UserError

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "none")
TOP_KEYS = {"description", "base", "metric", "trials", "parallel", "sampler", "pruner", "seed", "space", "enqueue"}


@dataclass
class Param:
    key: str
    kind: str  # float, int or choice
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    values: list = field(default_factory=list)

    def suggest(self, trial):
        """Optuna's suggestion for this key; choices are suggested by position (any YAML value works)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return self.values[trial.suggest_categorical(self.key, list(range(len(self.values))))]

    def value_of(self, params: dict):
        """The recipe value a trial's stored params stand for."""
        raw = params[self.key]
        return self.values[raw] if self.kind == "choice" else raw

    def stored(self, value):
        """What Optuna stores for a recipe value of this key (a choice's position)."""
        if self.kind != "choice":
            return value
        if value not in self.values:
            raise UserError(f"enqueue: {value!r} is not one of space.{self.key}'s values {self.values}")
        return self.values.index(value)

    def first(self):
        return self.values[0] if self.kind == "choice" else self.low


@dataclass
class SearchSpec:
    base: list[str]
    params: list[Param]
    metric: str | None
    trials: int
    parallel: int
    sampler: str
    pruner: str
    seed: int
    description: str = ""
    enqueue: list[dict] = field(default_factory=list)

    def words_for(self, values: dict) -> list[str]:
        """The run's words: the base, then each searched key's value."""
        from launcher.cluster.sweep import word_value

        return [*self.base, *(f"{p.key}={word_value(values[p.key])}" for p in self.params)]


def _param(key: str, entry, where: str) -> Param:
    if not isinstance(entry, dict) or entry.get("type") not in ("float", "int", "choice"):
        raise UserError(f"{where}: space.{key} needs a type: {{type: float, low: .., high: .., log: true}}, "
                        "{type: int, low: .., high: .., step: ..} or {type: choice, values: [...]}")
    kind = entry["type"]
    allowed = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "step", "log"},
               "choice": {"type", "values"}}[kind]
    if set(entry) - allowed:
        raise UserError(f"{where}: space.{key} ({kind}) takes {sorted(allowed)}; found {sorted(set(entry) - allowed)}")
    if kind == "choice":
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: space.{key} needs a non-empty list of values")
        return Param(key, kind, values=values)
    number = float if kind == "float" else int
    try:
        low, high = number(entry["low"]), number(entry["high"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: space.{key} needs {kind} low and high (e.g. low: 1.0e-5, high: 1.0e-3)") from None
    if kind == "int" and (entry["low"] != low or entry["high"] != high):
        raise UserError(f"{where}: space.{key} is an int range: low and high must be whole numbers")
    if not low < high:
        raise UserError(f"{where}: space.{key} needs low < high (got {low} and {high})")
    log = bool(entry.get("log", False))
    if log and low <= 0:
        raise UserError(f"{where}: space.{key} is log-scaled, so low must be above 0")
    step = entry.get("step")
    if step is not None and (not isinstance(step, int) or step < 1):
        raise UserError(f"{where}: space.{key} step must be a whole number >= 1")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def load_search_file(path: str) -> SearchSpec:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such search file")
    try:
        spec = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict) or set(spec) - TOP_KEYS:
        found = sorted(set(spec) - TOP_KEYS) if isinstance(spec, dict) else spec
        raise UserError(f"{path}: a search file has the keys {sorted(TOP_KEYS)}; unknown: {found}")
    space = spec.get("space")
    if not isinstance(space, dict) or not space:
        raise UserError(f"{path}: `space` maps each searched recipe key to its range (see tunefleet search --help)")
    base = [str(w) for w in spec.get("base", [])]
    if any("=" not in w for w in base):
        raise UserError(f"{path}: every base entry is key=value")
    for name, options in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if spec.get(name, options[0]) not in options:
            raise UserError(f"{path}: {name} is one of {', '.join(options)} (got {spec[name]!r})")
    for name, default in (("trials", 10), ("parallel", 1), ("seed", 0)):
        value = spec.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise UserError(f"{path}: {name} must be a whole number{'' if name == 'seed' else ' >= 1'} (got {value!r})")
    params = [_param(str(k), v, path) for k, v in space.items()]
    enqueue = spec.get("enqueue", []) or []
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise UserError(f"{path}: enqueue is a list of mappings from searched keys to values")
    keys = {p.key for p in params}
    for entry in enqueue:
        if set(entry) - keys:
            raise UserError(f"{path}: enqueue names {sorted(set(entry) - keys)}, which are not in space")
    return SearchSpec(base=base, params=params, enqueue=enqueue,
                      metric=spec.get("metric"), trials=spec.get("trials", 10), parallel=spec.get("parallel", 1),
                      sampler=spec.get("sampler", "tpe"), pruner=spec.get("pruner", "median"),
                      seed=spec.get("seed", 0), description=str(spec.get("description", "")))


def check_spec(spec: SearchSpec, extra_words: list[str]) -> tuple[str, str]:
    """Validate the recipe a trial would run (at each range's low end / first choice, and high end);
    return (the metric's key as metrics.jsonl writes it, "minimize" or "maximize")."""
    from launcher.config.load import load_recipe
    from launcher.train.evaluate import HIGHER_IS_BETTER
    from launcher.train.selection import eval_key

    for pick in (lambda p: p.first(), lambda p: p.values[-1] if p.kind == "choice" else p.high):
        words = spec.words_for({p.key: pick(p) for p in spec.params}) + extra_words
        _, recipe = load_recipe(words)
    metric = spec.metric or recipe.eval.metric
    direction = "maximize" if metric.removeprefix("eval_") in HIGHER_IS_BETTER else "minimize"
    if not recipe.eval.every_steps and spec.pruner != "none":
        raise UserError(f"pruner={spec.pruner} stops poor trials from their evaluations during training: set "
                        "eval.every_steps in the base words (e.g. eval.every_steps=10), or pruner: none")
    return eval_key(metric), direction
