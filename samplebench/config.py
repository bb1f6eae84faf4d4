"""Hydra configuration: overrides in, one resolved config per sweep cell out.

Hydra's compose API builds each config; comma lists and the default sweep in
conf/config.yaml (hydra.sweeper.params) are expanded here into cells, so one worker can serve
every cell of a model instead of one process per sweep point.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from samplebench import speed
from samplebench.errors import UsageError
from samplebench.models import is_analytic
from samplebench.samplers.base import GUIDANCE_KINDS

GROUPS = ("model", "sampler", "schedule", "metrics", "prompts", "launcher")


def conf_dir() -> Path:
    """conf/ at the repository root, or $SAMPLEBENCH_CONF."""
    env = os.environ.get("SAMPLEBENCH_CONF")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "conf"


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@dataclass(frozen=True)
class Cell:
    """One sweep point: model, sampler with its options, schedule, NFE budget and guidance scale."""

    model_label: str
    sampler_label: str
    nfe: int
    guidance: float
    model: dict[str, Any] = field(hash=False, compare=False)
    sampler: dict[str, Any] = field(hash=False, compare=False)
    config: dict[str, Any] = field(hash=False, compare=False)
    schedule_label: str = "karras"

    @property
    def schedule(self) -> dict[str, Any]:
        return self.config.get("schedule") or {"name": self.schedule_label}

    @property
    def rel_dir(self) -> Path:
        return (
            Path(self.model_label)
            / self.sampler_label
            / self.schedule_label
            / f"nfe={self.nfe}"
            / f"cfg={self.guidance:g}"
        )

    @property
    def config_hash(self) -> str:
        """Identity of everything that changes the samples (not where they are written): the resolved
        config and the content it reads from disk (config["content"], filled in by plan.record)."""
        keys = (
            "model",
            "sampler",
            "schedule",
            "nfe",
            "guidance",
            "seed",
            "allow_lower_nfe",
            "prompts",
            "content",
        )
        if is_analytic(str(self.model.get("name"))):
            keys = tuple(k for k in keys if k != "prompts")  # its conditions come from the seed, not prompts
        ident = {k: self.config.get(k) for k in keys}
        # speed switches enter only when not at their defaults (older identities stay what they were)
        ident["model"] = speed.identity_model(self.config.get("model") or {})
        ident |= speed.identity_extra(self.config)
        if not ident["content"]:  # nothing read from disk (analytic model): the hash it had before content
            del ident["content"]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def model_hash(self) -> str:
        """The loaded model's identity: cells with equal model_hash share one load (and its switches)."""
        ident = speed.identity_model(self.model) | speed.identity_extra(self.config)
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# Where weights come from changes the identity (the hash) but not the readable label.
# So do the speed switches (samplebench/speed.py): they change how the numbers are made, not what is
# compared, and one run may hold a model's cells made with and without them only under another run= name.
_UNLABELLED = {"name", "path", "id", "allow_pickle", *speed.MODEL_DEFAULTS}


def _label(name: str, chosen: dict[str, Any], defaults: dict[str, Any]) -> str:
    """`dpmpp`, or `dpmpp[solver_order=3]` when options differ from the group file; safe as a folder name."""
    diff = [
        f"{k}={chosen[k]}" for k in sorted(chosen) if k not in _UNLABELLED and chosen[k] != defaults.get(k)
    ]
    label = f"{name}[{','.join(diff)}]" if diff else name
    return re.sub(r"[^A-Za-z0-9_.,=:\[\]+-]", "_", label)


def _check_override(key: str, values: list[str], base: DictConfig) -> None:
    """One-line errors for unknown keys and choices, listing what is valid."""
    key = key.lstrip("+~")
    top = key.split(".")[0]
    if key in GROUPS:
        valid = group_choices(key)
        for v in (v.replace("\\", "") for v in values):  # Hydra escapes ':' in sweep values
            if v not in valid:
                raise UsageError(
                    f"{key}={v} is unknown{_suggest(v, valid)}; choose one of {', '.join(valid)}"
                )
        return
    valid_top = sorted(k for k in base.keys() if k != "hydra")
    if top not in valid_top:
        raise UsageError(f"unknown key '{key}'{_suggest(top, valid_top)}; valid keys: {', '.join(valid_top)}")


def _check_nested(key: str, cfg: DictConfig) -> None:
    head, _, rest = key.partition(".")
    if rest and head in GROUPS:
        node = cfg[head]
        if rest.split(".")[0] not in node:
            valid = sorted(k for k in node.keys() if k != "name")
            choice = node.get("name", head)
            hint = _suggest(rest, valid)
            raise UsageError(f"unknown key '{key}' for {head}={choice}{hint}; valid keys: {', '.join(valid)}")


def plan(overrides: list[str]) -> list[Cell]:
    """Expand command-line overrides (and the default sweep) into cells."""
    # paths= and paths.<model>= add keys to the empty `paths` map: Hydra's force-add (++) without the user
    # having to know it
    overrides = ["++" + o if re.match(r"^paths[.=]", o) else o for o in overrides]
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise UsageError(f"cannot parse overrides: {str(e).splitlines()[0]}") from e
    base = _compose([], hydra_config=True)
    params = dict(OmegaConf.to_container(base.hydra.sweeper.params or {}, resolve=True))
    given = {o.get_key_element(): o for o in parsed}
    axes: list[list[str]] = []
    for key, spec in params.items():
        if key not in given:
            vals = [v.strip() for v in str(spec).split(",")]
            axes.append([f"{key}={v}" for v in vals])
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            vals = list(o.sweep_string_iterator())
            _check_override(key, vals, base)
            axes.append([f"{key}={v}" for v in vals])
        else:
            if o.value() is not None and key.lstrip("+~") in GROUPS:
                _check_override(key, [str(o.value())], base)
            else:
                _check_override(key, [], base)
            axes.append([o.input_line])
    # A model whose own pipelines space steps otherwise (flow matching: schedule=flow) names it as
    # model.default_schedule; it is used where the sweep does not choose a schedule.
    schedule_given = any(k.lstrip("+~") == "schedule" for k in given)
    cells: list[Cell] = []
    for combo in itertools.product(*axes):
        try:
            cfg = _compose(list(combo))
            preferred = None if schedule_given else cfg.model.get("default_schedule")
            if preferred and preferred != cfg.schedule.get("name"):
                cfg = _compose([*combo, f"schedule={preferred}"])
        except HydraException as e:
            choices = [item for item in combo if item.split("=")[0].lstrip("+~") in GROUPS]
            groups_only = _compose(choices)
            for item in combo:
                _check_nested(item.split("=")[0].lstrip("+~"), groups_only)
            raise UsageError(" ".join(str(e).split())) from e
        cells.append(_make_cell(cfg))
    seen: dict[Path, Cell] = {}
    for c in cells:
        if c.rel_dir in seen and seen[c.rel_dir].config_hash != c.config_hash:
            raise UsageError(f"two cells of this sweep map to {c.rel_dir}; give them different options")
        seen[c.rel_dir] = c
    return list(seen.values())


def _make_cell(cfg: DictConfig) -> Cell:
    c = OmegaConf.to_container(cfg, resolve=True)
    _model_path(c)
    validate(c)
    kind = c["model"].get("guidance_kind", "cfg")
    if kind not in GUIDANCE_KINDS:
        raise UsageError(f"model.guidance_kind={kind} is unknown; choose one of {', '.join(GUIDANCE_KINDS)}")
    if kind == "none":
        # A model without guidance runs once, at guidance=1, in a sweep that guides the others.
        if float(c["guidance"]) != 1.0:
            _note_once(
                f"model={c['model']['name']} takes no guidance (guidance_kind: none): its cells run at "
                f"guidance=1, not guidance={c['guidance']:g}"
            )
        c["guidance"] = 1.0
    model_default = OmegaConf.to_container(
        OmegaConf.load(conf_dir() / "model" / f"{c['model']['name']}.yaml")
    )
    sampler_default = OmegaConf.to_container(
        OmegaConf.load(conf_dir() / "sampler" / f"{c['sampler']['name']}.yaml")
    )
    schedule_default = OmegaConf.to_container(
        OmegaConf.load(conf_dir() / "schedule" / f"{c['schedule']['name']}.yaml")
    )
    return Cell(
        model_label=_label(c["model"]["name"], c["model"], model_default),
        sampler_label=_label(c["sampler"]["name"], c["sampler"], sampler_default),
        nfe=c["nfe"],
        guidance=float(c["guidance"]),
        model=c["model"],
        sampler=c["sampler"],
        config=c,
        schedule_label=_schedule_label(c["schedule"], schedule_default),
    )


def _model_path(c: dict[str, Any]) -> None:
    """paths={sd15:/a,lcm:/b}: the cell's model gets model.path from its entry (over a model.path= given
    to every model of the sweep), so one sweep can point two models at two local folders."""
    paths = c.get("paths") or {}
    if not isinstance(paths, dict):
        raise UsageError(f"paths={paths} must map model names to folders, e.g. paths={{sd15:/a,lcm:/b}}")
    unknown = sorted(str(k) for k in paths if str(k) not in group_choices("model"))
    if unknown:
        raise UsageError(
            f"paths.{unknown[0]} names no model{_suggest(unknown[0], group_choices('model'))}; "
            f"choose among {', '.join(group_choices('model'))}"
        )
    name = c["model"]["name"]
    if paths.get(name) is not None:
        c["model"]["path"] = str(paths[name])


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        print(message, file=sys.stderr)


def _schedule_label(chosen: dict[str, Any], defaults: dict[str, Any]) -> str:
    """`karras`, `karras[rho=5.0]`; a custom list is named by a short hash of its levels."""
    if chosen.get("name") == "custom" and chosen.get("sigmas"):
        levels = json.dumps([float(v) for v in chosen["sigmas"]])
        rest = {k: v for k, v in chosen.items() if k != "sigmas"}
        base = _label("custom", rest, {k: v for k, v in defaults.items() if k != "sigmas"})
        return f"{base}@{hashlib.sha256(levels.encode()).hexdigest()[:8]}"
    return _label(str(chosen["name"]), chosen, defaults)


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate(c: dict[str, Any]) -> None:
    """Types and ranges of the top-level keys, each a one-line error."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(c["nfe"]) or c["nfe"] <= 0:
        raise UsageError(
            f"nfe={c['nfe']} must be a positive integer (model evaluations per sample), e.g. nfe=10"
        )
    g = c["guidance"]
    if isinstance(g, bool) or not isinstance(g, int | float) or g < 0:
        raise UsageError(f"guidance={g} must be a number >= 0 (1 = no guidance), e.g. guidance=7.5")
    for key in ("num_images", "batch_size", "shard_size"):
        if not is_int(c[key]) or c[key] <= 0:
            raise UsageError(f"{key}={c[key]} must be a positive integer")
    if not is_int(c["seed"]) or c["seed"] < 0:
        raise UsageError(f"seed={c['seed']} must be a non-negative integer")
    if not isinstance(c["run"], str) or not _RUN_NAME.match(c["run"]):
        raise UsageError(f"run={c['run']} must be a plain folder name (letters, digits, '_', '-', '.')")
    worker = c.get("worker")
    if worker is not None and (not isinstance(worker, str) or not _RUN_NAME.match(worker)):
        # It names <run>/workers/<worker>.jsonl: a path would write outside the run.
        raise UsageError(
            f"worker={worker} must be a plain name (letters, digits, '_', '-', '.'), e.g. worker=gpu0"
        )
    from samplebench.metrics.names import ALL

    names = (c.get("metrics") or {}).get("names") or []
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise UsageError(
            f"metric {unknown[0]} is unknown{_suggest(str(unknown[0]), list(ALL))}; "
            f"choose from {', '.join(ALL)}"
        )
    from samplebench.models import is_analytic, mixture_spec

    model = c.get("model") or {}
    if is_analytic(str(model.get("name"))):
        # The analytic model's preset and keys, checked before anything is planned or written.
        from samplebench.models.gmm import check_spec

        check_spec(mixture_spec(model))
    width = ((c.get("metrics") or {}).get("mmd") or {}).get("bandwidth", "auto")
    if width not in (None, "auto") and (
        isinstance(width, bool) or not isinstance(width, int | float) or not width > 0
    ):
        raise UsageError(
            f"metrics.mmd.bandwidth={width} must be auto or a positive number (mmd_exact's kernel width)"
        )
    if not is_int(c.get("workers", 1)) or c.get("workers", 1) < 1:
        raise UsageError(f"workers={c.get('workers')} must be a positive integer (local worker processes)")
    timing = c.get("timing") or {}
    repeats = timing.get("repeats", "auto")
    if repeats != "auto" and (not is_int(repeats) or repeats < 1):
        raise UsageError(
            f"timing.repeats={repeats} must be auto or a positive integer (timed calls per cell at least)"
        )
    if not isinstance(timing.get("warmup", True), bool):
        raise UsageError(f"timing.warmup={timing.get('warmup')} must be true or false")
    if c.get("on_change", "refuse") not in ("refuse", "restart"):
        raise UsageError(
            f"on_change={c.get('on_change')} is unknown; choose refuse (default) or restart (start cells "
            "whose inputs changed over)"
        )
    if not isinstance(c["allow_lower_nfe"], bool):
        raise UsageError("allow_lower_nfe must be true or false")
    speed.check(c)
