"""Sweeps: one YAML file names models x overrides; it expands to a numbered list of runs.

A slurm array task (or anything else that can count) asks for run INDEX and gets the
`stm-train` arguments of exactly one run, with its own run directory. The order is fixed
(models outer, grid inner, both in file order), so index i means the same run every time the
file is expanded, which is what makes a requeued array task resume its own run.

    name: paper                      # run dirs: <runs_root>/<name>/<model>[__<grid values>]
    configs: configs                 # folder holding <model>.yaml
    models: [unified_halo_micro, ...]
    overrides: [train.seed=0]        # applied to every run
    grid:                            # optional: every combination becomes a run
      optim.lr: [1.0e-3, 2.0e-3]

The runs root comes from `--runs-root`, else $STM_RUNS_ROOT, else the file's `runs_root`, else
`runs` (relative to the working directory), so nothing here names a cluster path.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field

import yaml

from stm_dist import package_data

_KNOWN_KEYS = {"name", "configs", "models", "overrides", "grid", "runs_root"}
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*=")


class SweepError(ValueError):
    """A problem with a sweep file; the message names the file and the key at fault."""


@dataclass
class Task:
    index: int
    model: str
    config: str                        # absolute path of the model's experiment YAML
    overrides: list[str]               # common overrides, then this task's grid values
    run_dir: str
    grid_values: dict = field(default_factory=dict)

    def train_args(self) -> list[str]:
        """The argument vector of `stm-train` for this run (run.out_dir last, so it wins)."""
        return ["--config", self.config, *self.overrides, f"run.out_dir={self.run_dir}"]


@dataclass
class Sweep:
    path: str
    name: str
    configs_dir: str
    models: list[str]
    overrides: list[str]
    grid: dict
    runs_root: str | None

    def tasks(self, runs_root: str | None = None) -> list[Task]:
        root = runs_root or os.environ.get("STM_RUNS_ROOT") or self.runs_root or "runs"
        root = os.path.abspath(root)
        keys = list(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys))) or [()]
        out = []
        for model in self.models:
            config = os.path.join(self.configs_dir, f"{model}.yaml")
            for combo in combos:
                values = dict(zip(keys, combo))
                suffix = "".join(f"__{_slug(k)}={_slug(v)}" for k, v in values.items())
                extra = [f"{k}={_yaml_scalar(v)}" for k, v in values.items()]
                out.append(Task(index=len(out), model=model, config=config,
                                overrides=list(self.overrides) + extra,
                                run_dir=os.path.join(root, self.name, model + suffix),
                                grid_values=values))
        return out

    def task(self, index: int, runs_root: str | None = None) -> Task:
        tasks = self.tasks(runs_root)
        if not 0 <= index < len(tasks):
            raise SweepError(f"{self.path}: task index {index} is out of range: the sweep has "
                             f"{len(tasks)} runs (valid indices 0-{len(tasks) - 1})")
        return tasks[index]


def _slug(value) -> str:
    """A grid value as it appears in a directory name: no separators, no spaces."""
    text = os.path.basename(str(value).rstrip("/")) or str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", text)


def _yaml_scalar(value) -> str:
    # Overrides are parsed as YAML by stm-train; dump keeps 1e-3 a float and "0" a string.
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _find_dir(folder: str, sweep_path: str) -> str:
    """Relative folders are tried from the working directory, the sweep file's folder and its
    parents, then as the folders shipped with stm_dist (the package's copy or the checkout's)."""
    if os.path.isabs(folder):
        return folder
    here = os.path.dirname(os.path.abspath(sweep_path))
    candidates = [os.path.abspath(folder)]
    while True:
        candidates.append(os.path.join(here, folder))
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    shipped = package_data.shipped(folder)
    if shipped:
        candidates.append(shipped)
    for c in candidates:
        if os.path.isdir(c):
            return os.path.normpath(c)
    return os.path.abspath(folder)


def _find_file(arg: str) -> str:
    """A sweep file: a path (from the working directory, or shipped such as sweeps/paper.yaml),
    or the name of a shipped sweep (`paper`)."""
    if os.path.isfile(arg):
        return arg
    found = package_data.shipped(arg) or package_data.find_named(arg, "sweeps")
    if found and os.path.isfile(found):
        return found
    close = package_data.close_names(arg, "sweeps")
    hint = f" (shipped sweeps: {', '.join(package_data.names('sweeps'))})" if package_data.names("sweeps") else ""
    raise SweepError(f"sweep file not found: {arg}" + (f"; did you mean {', '.join(close)}?" if close else hint))


def load(path: str) -> Sweep:
    path = _find_file(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: top level must be a mapping (name, configs, models, ...)")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(_KNOWN_KEYS)}")

    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SweepError(f"{path}: 'name' must be a plain folder name, got {name!r}")

    models = raw.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise SweepError(f"{path}: 'models' must be a non-empty list of model names")
    dupes = sorted({m for m in models if models.count(m) > 1})
    if dupes:
        raise SweepError(f"{path}: 'models' lists {dupes} more than once (two runs, one run dir)")

    configs_dir = _find_dir(str(raw.get("configs", "configs")), path)
    for m in models:
        cfg = os.path.join(configs_dir, f"{m}.yaml")
        if not os.path.isfile(cfg):
            raise SweepError(f"{path}: model '{m}' has no config: {cfg} does not exist "
                             f"(key 'configs' is {raw.get('configs', 'configs')!r})")

    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list):
        raise SweepError(f"{path}: 'overrides' must be a list of section.key=value strings")
    for o in overrides:
        if not isinstance(o, str) or not _OVERRIDE.match(o):
            raise SweepError(f"{path}: override {o!r} in 'overrides' is not section.key=value")
        if o.startswith("run.out_dir="):
            raise SweepError(f"{path}: 'overrides' must not set run.out_dir: each run gets its own "
                             f"directory under the runs root")

    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: 'grid' must map section.key to a list of values")
    for k, values in grid.items():
        if not isinstance(k, str) or not _OVERRIDE.match(f"{k}="):
            raise SweepError(f"{path}: grid key {k!r} is not section.key")
        if k == "run.out_dir":
            raise SweepError(f"{path}: grid must not vary run.out_dir")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid key '{k}' must have a non-empty list of values")

    runs_root = raw.get("runs_root")
    if runs_root is not None and not isinstance(runs_root, str):
        raise SweepError(f"{path}: 'runs_root' must be a path string")
    return Sweep(path=path, name=name, configs_dir=configs_dir, models=models,
                 overrides=overrides, grid=grid, runs_root=runs_root)
