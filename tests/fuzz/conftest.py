"""Hypothesis profiles for the fuzz tests.

`ci` (the default, in `make test`): a few dozen examples per property, so the whole fuzz suite
takes well under a minute. `long` (`make fuzz`, or HYPOTHESIS_PROFILE=long): thousands of
examples per property. Only CI is derandomised, so that a failure there is reproducible from
the log; the long profile explores new inputs on every run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SLOW_INPUTS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=SLOW_INPUTS,
    print_blob=True,
)
settings.register_profile(
    "long", max_examples=3000, deadline=None, suppress_health_check=SLOW_INPUTS,
    print_blob=True,
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# Applied per test (`@FUZZ`) rather than loaded globally, so other hypothesis tests keep theirs.
FUZZ = settings.get_profile(PROFILE)


def fuzz(ci_examples: int) -> settings:
    """FUZZ, with fewer examples in CI for a property whose examples are slow to run."""
    if PROFILE != "ci":
        return FUZZ
    return settings(FUZZ, max_examples=ci_examples)
