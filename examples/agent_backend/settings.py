"""Backend settings from the environment, read once at import; bad values name the variable."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    default_scenario: str = "S0"  # DEMO_SCENARIO: used when a request names none
    step_delay_s: float = 0.002  # DEMO_STEP_DELAY_S: the fake workload's pause between steps
    #: DEMO_CONFIG_LOAD_DELAY_S: the longest S1's config load (between configuring the shared factory and
    #: using it) waits for another request to reconfigure the factory. Longer than two concurrent
    #: requests arrive apart, shorter than the demo sidecar's run_idle_s (1 s): the last request of a
    #: burst waits this long mid-run
    config_load_delay_s: float = 0.25
    s11_ramp_runs: int = 40  # DEMO_S11_RAMP_RUNS: S11 runs until the canonical engine gets 100%

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            default_scenario=env.get("DEMO_SCENARIO", "").strip().upper() or defaults.default_scenario,
            step_delay_s=_number(env, "DEMO_STEP_DELAY_S", defaults.step_delay_s, float, minimum=0),
            config_load_delay_s=_number(env, "DEMO_CONFIG_LOAD_DELAY_S", defaults.config_load_delay_s,
                                        float, minimum=0),
            s11_ramp_runs=_number(env, "DEMO_S11_RAMP_RUNS", defaults.s11_ramp_runs, int, minimum=1),
        )


def _number(env, name, default, kind, minimum):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


settings = Settings.from_env()
