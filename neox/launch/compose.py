"""Compose the run config from conf/ with Hydra, and turn Hydra's errors into one line naming the fix."""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterator, List

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from neox.config.schema import register_configs
from neox.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MAX_PREFLIGHT = 64  # sweep combinations validated before any job starts


def plan_shorthand(overrides: List[str]) -> List[str]:
    """`plan=true|false` -> `plan.show=...`: plan is a section (show, force), which Hydra cannot set to a bool."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+~") == "plan" and value.strip().lower() in ("true", "false"):
            o = f"plan.show={value.strip().lower()}"
        out.append(o)
    return out


def compose_config(overrides: List[str]) -> DictConfig:
    """The run config for these command-line overrides (no sweeps)."""
    overrides = plan_shorthand(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(cfg)
        _require_complete(cfg)
        return cfg
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def _require_complete(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} must be set, e.g. {missing[0]}=<value> on the command line")


def sweep_combinations(overrides: List[str]) -> Iterator[List[str]]:
    """Expand `a=1,2 b=x,y` into every single-run override list, as Hydra's basic sweeper does."""
    try:
        parsed = OverridesParser.create().parse_overrides(plan_shorthand(overrides))
    except HydraException as exc:
        raise ConfigError(explain(exc)) from None
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    yield from itertools.islice((list(c) for c in itertools.product(*choices)), MAX_PREFLIGHT)


def explain(exc: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    full = f"{text}\n{cause}" if cause else text
    if isinstance(exc, MissingConfigException) or "Could not find" in text:
        m = re.search(r"Could not find '([^']+)/([^']+)'", text)
        options = [o for o in re.findall(r"^\s+(\S+)$", text, flags=re.M) if not o.endswith("_schema")]
        if m:
            avail = f"; available: {', '.join(options)}" if options else ""
            return f"{m.group(1)}={m.group(2)} is not a preset in conf/{m.group(1)}/{avail}"
    m = re.search(r"Could not override '([^']+)'", full) or re.search(r"Key '([^']+)' (?:is )?not in", full)
    if m and ("not in struct" in full or "not in '" in full or "Could not override" in full):
        key = m.group(1)
        return (f"unknown config key '{key}': check its spelling "
                "(`python launch.py --cfg job` prints every key with its default)")
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", full)
    if m:
        key = re.search(r"full_key: (\S+)", full)
        where = key.group(1) if key else "a field"
        return f"{where}={m.group(1)!r} is not a valid {m.group(2).lower()}"
    m = re.search(r"Missing mandatory value: (\S+)", full)
    if m:
        return f"{m.group(1)} must be set, e.g. {m.group(1)}=<value> on the command line"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"invalid config: {first}"
