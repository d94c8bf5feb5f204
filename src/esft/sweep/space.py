"""The sweep file, parsed and checked: a search space over training settings as Optuna distributions,
the sampler, the pruner and the objective, with one-line errors that say what to change.

```yaml
method: es                      # or grpo
base: {task: conciseness, iterations: 10, eval_every: 5}   # any settings, as in --config files
space:
  sigma: {low: 1.0e-4, high: 1.0e-2, log: true}             # FloatDistribution
  population: {choices: [8, 16, 30]}                        # CategoricalDistribution
  rank: {low: 1, high: 4}                                   # IntDistribution (an int setting)
  alpha: {expr: sigma / 2}                                  # derived, not sampled
n_trials: 20
objective: {metric: eval/reward, direction: maximize}
sampler: tpe                    # or {name: tpe, seed: 0, n_startup_trials: 5}; random, grid
pruner: median                  # or {name: median, n_startup_trials: 5}; none, hyperband, threshold, ...
```

A range is ``{low, high}`` with optional ``log: true`` or ``step``; an int setting gets an
``IntDistribution``, a float one a ``FloatDistribution``. ``{choices: [...]}`` is categorical (any
setting that takes a number, a string or a boolean). ``{expr: ...}`` computes a setting from sampled
ones (+ - * / ** and parentheses; e.g. the paper's alpha = sigma / 2): it is recorded with the trial
(user attribute ``derived``) but is not a parameter Optuna samples. Every bound, choice and corner of an
expression is checked against the trainer's own validation before the first trial starts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

from esft.config import ESConfig, GRPORunConfig, RunConfig
from esft.errors import ConfigError, first_line
from esft.sweep.layout import import_optuna

METHODS: dict[str, type[RunConfig]] = {"es": ESConfig, "grpo": GRPORunConfig}
TRAINER_NAMES = {"es": "an ES", "grpo": "a GRPO"}
KEYS = (
    "method",
    "base",
    "space",
    "n_trials",
    "objective",
    "sampler",
    "pruner",
    "storage",
    "study_name",
    "enqueue",
    "catch",
)
DEFAULT_TRIALS = 20
DEFAULT_SEED = 0

# Settings a trial may not vary, and why (anything else that takes a number, a string or a boolean may).
FIXED = {
    "output": "the sweep gives every trial its own run folder (SWEEP/trials/trial-NNNN)",
    "eval_every": "the objective is read at the periodic evaluation, which must be alike in every trial",
    "eval_limit": "the objective is read at the periodic evaluation, which must be alike in every trial",
    "eval_split": "the objective is read at the periodic evaluation, which must be alike in every trial",
    "task": "the objective must measure the same task in every trial",
    "checkpoint_every": "it changes what is saved, not what is learned",
    "keep_checkpoints": "it changes what is saved, not what is learned",
    "device": "it says where a trial runs, not what it learns",
    "batch_size": "it says how a trial's prompts are batched, not what it learns",
    "workers": "it says where a trial runs, not what it learns",
    "ray_address": "it says where a trial runs, not what it learns",
    "gpus_per_worker": "it says where a trial runs, not what it learns",
    "worker_timeout": "it says where a trial runs, not what it learns",
}

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "threshold": "ThresholdPruner",
    "none": "NopPruner",
}
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _field_kind(cls: type[RunConfig], name: str) -> tuple[type | None, bool]:
    """(the Python type a searched value of setting ``name`` must have, whether None is allowed);
    (None, _) for settings Optuna cannot sample (lists, mappings)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    parts = [p.strip() for p in types[name].split("|")]
    nullable = "None" in parts
    parts = [p for p in parts if p != "None"]
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    if len(parts) == 1 and parts[0] in kinds:
        return kinds[parts[0]], nullable
    return None, nullable


def _number(value: Any) -> Any:
    """A number given as text (PyYAML reads 1e-4, without a dot, as a string) as a number."""
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return value
        return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _type_ok(kind: type, value: Any) -> bool:
    if kind is float:
        return _is_number(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]


# -- derived settings ------------------------------------------------------------------------------


@dataclass
class Expr:
    """A setting computed from sampled parameters: + - * / ** over their names and numbers."""

    text: str
    names: list[str]
    tree: ast.Expression

    def __call__(self, values: dict[str, Any]) -> float:
        def ev(node: ast.AST) -> float:
            if isinstance(node, ast.Expression):
                return ev(node.body)
            if isinstance(node, ast.Constant):
                return node.value
            if isinstance(node, ast.Name):
                return values[node.id]
            if isinstance(node, ast.UnaryOp):
                v = ev(node.operand)
                return -v if isinstance(node.op, ast.USub) else +v
            assert isinstance(node, ast.BinOp)
            return _OPS[type(node.op)](ev(node.left), ev(node.right))

        return ev(self.tree)


def _allowed(node: ast.AST) -> bool:
    """Whether an expression node is arithmetic (names and numbers are checked by the caller)."""
    if isinstance(node, ast.BinOp):
        return type(node.op) in _OPS
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.USub | ast.UAdd)
    return isinstance(node, ast.Expression | ast.operator | ast.unaryop | ast.expr_context)


def parse_expr(where: str, text: Any) -> Expr:
    if not isinstance(text, str | int | float) or isinstance(text, bool):
        raise ConfigError(f"{where}: expr must be an arithmetic expression such as 'sigma / 2'")
    text = str(text)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"{where}: expr {text!r} is not an arithmetic expression ({e.msg})") from None
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Constant):
            if not _is_number(node.value):
                raise ConfigError(
                    f"{where}: expr {text!r}: only numbers and parameter names, got {node.value!r}"
                )
        elif not _allowed(node):
            raise ConfigError(f"{where}: expr {text!r}: only + - * / ** and parentheses")
    return Expr(text, list(dict.fromkeys(names)), tree)


# -- the sweep spec --------------------------------------------------------------------------------


@dataclass
class SweepSpec:
    """A parsed, checked sweep file. ``to_dict()`` is what ``sweep.yaml`` holds (parse it back with
    ``parse_spec``)."""

    method: str
    base: dict[str, Any]
    space: dict[str, dict[str, Any]]  # as written (normalised): what sweep.yaml holds
    distributions: dict[str, Any]  # name -> optuna distribution (the sampled parameters)
    derived: dict[str, Expr]  # name -> expression (settings computed from the parameters)
    n_trials: int
    metric: str
    direction: str
    sampler: dict[str, Any]  # {"name": ..., **kwargs}
    pruner: dict[str, Any]
    storage: str = "sqlite"
    study_name: str | None = None
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    catch: bool = False

    @property
    def config_class(self) -> type[RunConfig]:
        return METHODS[self.method]

    def settings(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(a trial's settings: base + ``params`` + derived ones, the derived values alone)."""
        derived = {
            name: _derived_value(self.config_class, name, e(params)) for name, e in self.derived.items()
        }
        return {**self.base, **params, **derived}, derived

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space: every parameter's values."""
        return {name: list(d.choices) for name, d in self.distributions.items()}

    def make_sampler(self, seed_offset: int = 0):
        """The Optuna sampler; ``seed_offset`` moves its seed (a resumed sweep does not redraw the
        points it drew before it was interrupted)."""
        optuna = import_optuna()
        kwargs = {k: v for k, v in self.sampler.items() if k != "name"}
        if kwargs.get("seed") is not None:
            kwargs["seed"] = int(kwargs["seed"]) + seed_offset
        cls = getattr(optuna.samplers, SAMPLERS[self.sampler["name"]])
        if self.sampler["name"] == "grid":
            kwargs["search_space"] = self.grid()
            cls = _ask_tell_grid(cls)
        return _construct(cls, kwargs, "sampler")

    def make_pruner(self):
        optuna = import_optuna()
        kwargs = {k: v for k, v in self.pruner.items() if k != "name"}
        return _construct(getattr(optuna.pruners, PRUNERS[self.pruner["name"]]), kwargs, "pruner")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "base": self.base,
            "space": self.space,
            "n_trials": self.n_trials,
            "objective": {"metric": self.metric, "direction": self.direction},
            "sampler": self.sampler,
            "pruner": self.pruner,
            "storage": self.storage,
        }
        if self.study_name:
            out["study_name"] = self.study_name
        if self.enqueue:
            out["enqueue"] = self.enqueue
        out["catch"] = self.catch
        return out


def _derived_value(cls: type[RunConfig], name: str, value: Any) -> Any:
    kind, _ = _field_kind(cls, name)
    if kind is int:
        return round(value)
    return float(value) if kind is float else value


def _construct(cls: type, kwargs: dict[str, Any], what: str):
    try:
        return cls(**kwargs)
    except TypeError as e:
        known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "search_space")]
        bad = [k for k in kwargs if k not in known]
        if bad:
            raise ConfigError(
                f"{what}: {cls.__name__} takes no option {bad[0]!r}{_suggest(bad[0], known)} "
                f"(its options: {', '.join(known) or 'none'})"
            ) from None
        raise ConfigError(f"{what}: {cls.__name__}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{what}: {cls.__name__}: {first_line(e)}") from None


def _named(where: str, value: Any, names: dict[str, str], suffix: str) -> dict[str, Any]:
    """``sampler: tpe`` or ``sampler: {name: tpe, seed: 0}`` (Optuna's class names work too:
    TPESampler, MedianPruner) -> {"name": "tpe", ...}."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{where} must be a name ({', '.join(names)}) or a mapping with a name and options")
    raw = str(value["name"])
    key = raw.lower().replace("-", "_")
    key = key.removesuffix(suffix).rstrip("_") or key
    key = {"nop": "none", "successivehalving": "successive_halving"}.get(key, key)
    if key not in names:
        raise ConfigError(
            f"{where}: unknown {where} {raw!r}{_suggest(key, list(names))}; use {', '.join(names)}"
        )
    return {"name": key, **{k: v for k, v in value.items() if k != "name"}}


def parse_spec(data: Any, source: str = "sweep file") -> SweepSpec:
    """Parse and check a sweep file's mapping (see the module docstring); one-line ConfigErrors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping (method, base, space, n_trials, objective, ...)")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}{_suggest(unknown[0], list(KEYS))}; valid: {', '.join(KEYS)}"
        )
    method = str(data.get("method", "es")).lower()
    if method not in METHODS:
        raise ConfigError(f"{source}: method must be es or grpo, got {data.get('method')!r}")
    cls = METHODS[method]
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: base must be a mapping of settings, as in --config files")
    base = {str(k).replace("-", "_"): v for k, v in base.items()}
    other = "grpo" if method == "es" else "es"
    for k in base:
        if k not in cls.field_names() and k in METHODS[other].field_names():
            raise ConfigError(f"base.{k}: {TRAINER_NAMES[other]} setting, but the sweep's method is {method}")
    if "output" in base:
        raise ConfigError(f"base.output: {FIXED['output']}; give the sweep folder with --output")
    checked = cls.from_dict(base, f"{source}: base")
    if not checked.eval_every:
        raise ConfigError(
            "base.eval_every must be >= 1: trials are scored (and pruned) at the periodic evaluation, "
            "every eval_every iterations and at the end"
        )
    base_values = {k: v for k, v in checked.to_dict().items() if k in base}

    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"{source}: space must map settings to ranges, e.g. sigma: {{low: 1.0e-4, high: 1.0e-2, log: true}}"
        )
    distributions: dict[str, Any] = {}
    derived_text: dict[str, Any] = {}
    normal: dict[str, dict[str, Any]] = {}
    for raw_name, spec in space.items():
        name = str(raw_name).replace("-", "_")
        where = f"space.{name}"
        _check_searchable(cls, method, name)
        if not isinstance(spec, dict):
            raise ConfigError(
                f"{where}: give {{low: .., high: ..}}, {{choices: [..]}} or {{expr: ..}}; a fixed value "
                f"belongs in base ({name}: {spec!r})"
            )
        if "expr" in spec:
            extra = [k for k in spec if k != "expr"]
            if extra:
                raise ConfigError(f"{where}: expr stands alone, without {', '.join(map(str, extra))}")
            derived_text[name] = spec["expr"]
            normal[name] = {"expr": str(spec["expr"])}
            continue
        distributions[name], normal[name] = _distribution(cls, base_values, name, spec)

    derived: dict[str, Expr] = {}
    for name, text in derived_text.items():
        where = f"space.{name}"
        e = parse_expr(where, text)
        for n in e.names:
            if n not in distributions:
                what = "another derived setting" if n in derived_text else "not a searched parameter"
                raise ConfigError(
                    f"{where}: expr {e.text!r} names {n}, {what} (searched: {', '.join(distributions) or 'none'})"
                )
        _check_expr(cls, base_values, name, e, distributions)
        derived[name] = e
    if not distributions:
        raise ConfigError(f"{source}: space has no parameter to sample, only derived ones")

    n_trials = data.get("n_trials")
    sampler = _named("sampler", data.get("sampler", "tpe"), SAMPLERS, "sampler")
    sampler.setdefault("seed", DEFAULT_SEED)  # seeded by default: a sweep draws the same points again
    if sampler["name"] == "grid":
        for name, d in list(distributions.items()):
            distributions[name] = _grid_values(name, d)
        size = math.prod(len(d.choices) for d in distributions.values())
        n_trials = size if n_trials is None else n_trials
    n_trials = DEFAULT_TRIALS if n_trials is None else _number(n_trials)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError(f"n_trials must be an integer >= 1, got {data.get('n_trials')!r}")
    pruner = _named("pruner", data.get("pruner", "median"), PRUNERS, "pruner")

    objective = data.get("objective") or {}
    if isinstance(objective, str):
        objective = {"metric": objective}
    if not isinstance(objective, dict):
        raise ConfigError("objective must be a mapping: {metric: eval/reward, direction: maximize}")
    bad = [k for k in objective if k not in ("metric", "direction")]
    if bad:
        raise ConfigError(f"objective: unknown key {bad[0]!r}; valid: metric, direction")
    split = checked.eval_split
    metric = str(objective.get("metric") or ("eval/test/reward" if split == "both" else "eval/reward"))
    _check_metric(metric, split)
    direction = str(objective.get("direction", "maximize")).lower()
    if direction not in ("maximize", "minimize"):
        raise ConfigError(
            f"objective.direction must be maximize or minimize, got {objective.get('direction')!r}"
        )

    storage = str(data.get("storage") or "sqlite")
    if storage not in ("sqlite", "journal") and "://" not in storage:
        raise ConfigError(
            f"storage must be sqlite (SWEEP/study.db), journal (SWEEP/study.journal) or a database URL "
            f"(postgresql://...), got {storage!r}"
        )
    catch = data.get("catch", False)
    if not isinstance(catch, bool):
        raise ConfigError(f"catch must be true or false, got {catch!r}")
    enqueue = data.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(p, dict) for p in enqueue):
        raise ConfigError(
            "enqueue must be a list of parameter mappings, e.g. [{sigma: 1.0e-3, population: 30}]"
        )
    enqueue = [_check_enqueued(i, p, distributions, derived) for i, p in enumerate(enqueue)]

    spec = SweepSpec(
        method=method,
        base=base_values,
        space=normal,
        distributions=distributions,
        derived=derived,
        n_trials=n_trials,
        metric=metric,
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        storage=storage,
        study_name=str(data["study_name"]) if data.get("study_name") else None,
        enqueue=enqueue,
        catch=catch,
    )
    spec.make_sampler()  # the options are checked now, not at the first trial
    spec.make_pruner()
    return spec


def _check_searchable(cls: type[RunConfig], method: str, name: str) -> None:
    where = f"space.{name}"
    if name not in cls.field_names():
        other = "grpo" if method == "es" else "es"
        if name in METHODS[other].field_names():
            raise ConfigError(f"{where}: {TRAINER_NAMES[other]} setting, but the sweep's method is {method}")
        raise ConfigError(f"{where}: unknown setting{_suggest(name, cls.field_names())}")
    if name in FIXED:
        raise ConfigError(f"{where} cannot be searched: {FIXED[name]}")
    kind, _ = _field_kind(cls, name)
    if kind is None:
        raise ConfigError(
            f"{where} cannot be searched: Optuna samples numbers, strings and booleans, and {name} is a "
            "list or mapping (set it in base)"
        )


def _valid(cls: type[RunConfig], base: dict[str, Any], values: dict[str, Any]) -> str | None:
    """None if ``base`` + ``values`` is a valid config, else the trainer's one-line reason."""
    try:
        cls.from_dict({**base, **values}, "")
    except ConfigError as e:
        return str(e).removeprefix(": ")
    return None


def _distribution(cls: type[RunConfig], base: dict[str, Any], name: str, spec: dict[str, Any]):
    optuna = import_optuna()
    D = optuna.distributions
    where = f"space.{name}"
    kind, nullable = _field_kind(cls, name)
    assert kind is not None
    if "choices" in spec:
        extra = [k for k in spec if k != "choices"]
        if extra:
            raise ConfigError(f"{where}: choices stand alone, without {', '.join(map(str, extra))}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
        values = [_number(c) if kind in (int, float) else c for c in choices]
        for raw, v in zip(choices, values, strict=True):
            if not (_type_ok(kind, v) or (nullable and v is None)):
                raise ConfigError(f"{where}: choice {raw!r} is not {_type_name(kind)}, as {name} takes")
            why = _valid(cls, base, {name: v})
            if why:
                raise ConfigError(f"{where}: choice {raw!r} is not a valid setting: {why}")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: choices {choices!r} repeat a value")
        return D.CategoricalDistribution(values), {"choices": values}

    keys = ("low", "high", "log", "step")
    unknown = [k for k in spec if k not in keys]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), ['low', 'high', 'log', 'step', 'choices', 'expr'])}; "
            "a range is {low, high} with log: true or a step, else give choices or expr"
        )
    if kind not in (int, float):
        raise ConfigError(f"{where}: {name} takes {_type_name(kind)}, not a range of numbers: give choices")
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise ConfigError(f"{where}: a range needs low and high (missing {' and '.join(missing)})")
    low, high, step = _number(spec["low"]), _number(spec["high"]), _number(spec.get("step"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    for label, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _is_number(v):
            raise ConfigError(f"{where}: {label} must be a number, got {spec[label]!r}")
        if kind is int and not float(v).is_integer():
            raise ConfigError(f"{where}: {name} takes an integer, so {label} must be one, got {v!r}")
    if kind is int:
        low, high, step = int(low), int(high), None if step is None else int(step)
    if low >= high:
        raise ConfigError(f"{where}: low must be below high, got low {low!r} and high {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low!r}")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be > 0, got {step!r}")
    if log and step is not None and step != 1:
        raise ConfigError(f"{where}: log and step exclude each other (Optuna samples one or the other)")
    for label, v in (("low", low), ("high", high)):
        why = _valid(cls, base, {name: v})
        if why:
            raise ConfigError(f"{where}: {label} {v!r} is not a valid setting: {why}")
    normal: dict[str, Any] = {"low": low, "high": high}
    if log:
        normal["log"] = True
    if step is not None:
        normal["step"] = step
    if kind is int:
        return D.IntDistribution(low, high, log=log, step=step or 1), normal
    return D.FloatDistribution(float(low), float(high), log=log, step=step), normal


def _corners(d: Any) -> list[Any]:
    """The values an expression's check tries for a parameter: its bounds, or all its choices."""
    if hasattr(d, "choices"):
        return list(d.choices)
    return [d.low, d.high]


def _check_expr(
    cls: type[RunConfig], base: dict[str, Any], name: str, e: Expr, dists: dict[str, Any]
) -> None:
    where = f"space.{name}"
    kind, _ = _field_kind(cls, name)
    if kind not in (int, float):
        raise ConfigError(f"{where}: expr computes a number, and {name} takes {_type_name(kind)}")
    combos = list(itertools.product(*(_corners(dists[n]) for n in e.names)))[:256]
    for combo in combos:
        params = dict(zip(e.names, combo, strict=True))
        try:
            value = e(params)
        except (ZeroDivisionError, OverflowError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: expr {e.text!r} fails at {params}: {err}") from None
        if not _is_number(value):
            raise ConfigError(f"{where}: expr {e.text!r} is not a finite number at {params}: {value!r}")
        why = _valid(cls, base, {**params, name: _derived_value(cls, name, value)})
        if why:
            raise ConfigError(f"{where}: expr {e.text!r} gives an invalid setting at {params}: {why}")


def _check_metric(metric: str, split: str) -> None:
    if not metric.startswith("eval/"):
        raise ConfigError(
            f"objective.metric {metric!r}: the objective is a periodic-evaluation scalar, eval/<metric> "
            "(e.g. eval/reward, eval/accuracy)"
        )
    by_split = metric.startswith(("eval/train/", "eval/test/"))
    if split == "both" and not by_split:
        raise ConfigError(
            f"objective.metric {metric}: base.eval_split is both, so the scalars are "
            f"eval/test/{metric.removeprefix('eval/')} and eval/train/{metric.removeprefix('eval/')}; name one"
        )
    if split != "both" and by_split:
        short = metric.split("/", 2)[2]
        raise ConfigError(
            f"objective.metric {metric}: base.eval_split is {split}, so the scalar is eval/{short}"
        )


def _ask_tell_grid(grid_sampler: type) -> type:
    """Optuna's GridSampler for a driver that asks and tells: the stock one calls ``study.stop()`` once
    the grid is used up, which raises outside ``study.optimize``. The driver stops by counting trials
    (n_trials is at most the grid's size), so stopping is left to it."""

    class AskTellGridSampler(grid_sampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    # the stock name in the options' one-line errors ("GridSampler takes no option ...")
    AskTellGridSampler.__name__ = AskTellGridSampler.__qualname__ = grid_sampler.__name__
    return AskTellGridSampler


def _grid_values(name: str, d: Any):
    """A parameter of the grid sampler as the categorical list of its grid points."""
    optuna = import_optuna()
    if hasattr(d, "choices"):
        return d
    step = getattr(d, "step", None)
    if step is None or getattr(d, "log", False):
        raise ConfigError(
            f"space.{name}: the grid sampler needs choices or a step for every parameter (a continuous "
            "range has no grid)"
        )
    n = int(math.floor((d.high - d.low) / step + 1e-9)) + 1
    if n > 10_000:
        raise ConfigError(f"space.{name}: {n} grid points; give choices or a larger step")
    values = [d.low + i * step for i in range(n)]
    if isinstance(d, optuna.distributions.IntDistribution):
        values = [int(v) for v in values]
    else:
        values = [float(f"{v:.12g}") for v in values]
    return optuna.distributions.CategoricalDistribution(values)


def _check_enqueued(
    i: int, params: dict[str, Any], dists: dict[str, Any], derived: dict[str, Expr]
) -> dict[str, Any]:
    where = f"enqueue[{i}]"
    out = {}
    for k, v in params.items():
        if k in derived:
            raise ConfigError(f"{where}.{k}: derived from the parameters (expr), not enqueued")
        if k not in dists:
            raise ConfigError(f"{where}.{k}: not a parameter of the space{_suggest(str(k), list(dists))}")
        d, v = dists[k], _number(v)
        ok = v in d.choices if hasattr(d, "choices") else _is_number(v) and d.low <= v <= d.high
        if not ok:
            raise ConfigError(f"{where}.{k}: {v!r} is outside the space ({_describe(d)})")
        out[k] = v
    return out


def _describe(d: Any) -> str:
    if hasattr(d, "choices"):
        return f"choices {list(d.choices)}"
    return f"{d.low} to {d.high}" + (" log" if getattr(d, "log", False) else "")


def read_sweep_file(path: str) -> SweepSpec:
    """Read and parse a sweep file (YAML, TOML or JSON, like --config files)."""
    from esft.config import read_config_file

    return parse_spec(read_config_file(path), str(path))
