"""Sampler names as clients spell them -> our scheduler names (runtime/schedulers' SCHEDULER_NAMES).

The one table is runtime.images.A1111_SAMPLER_NAMES (our name -> A1111's, also used for PNG metadata);
this module only reads it the other way, and adds A1111's separate `scheduler` field ("Karras").
"""

from __future__ import annotations

from runtime.images import A1111_SAMPLER_NAMES
from runtime.serve.fields import FieldError

OURS_BY_A1111 = {a1111: ours for ours, a1111 in A1111_SAMPLER_NAMES.items()}
# A1111 >= 1.9 sends the noise schedule apart from the sampler: "DPM++ 2M" + "Karras".
_SCHEDULE_SUFFIX = {"karras": " Karras"}
_DEFAULT_SCHEDULES = ("", "automatic", "default")  # the sampler's own schedule


def scheduler_from_client(value, field: str, schedule=None, schedule_field: str = "scheduler") -> str | None:
    """None for absent (the model's own); our name for an A1111 name or one of ours; else a FieldError."""
    if value is None or value == "":
        if schedule not in (None, *_DEFAULT_SCHEDULES):
            raise FieldError(schedule_field, f"{schedule!r} needs a sampler_name to apply to")
        return None
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string, got {type(value).__name__}")
    if schedule is not None and not isinstance(schedule, str):
        raise FieldError(schedule_field, f"must be a string, got {type(schedule).__name__}")
    schedule = (schedule or "").strip().lower()
    if schedule not in _DEFAULT_SCHEDULES:
        if schedule not in _SCHEDULE_SUFFIX:
            raise FieldError(schedule_field, f"unknown schedule {schedule!r}; this server knows: automatic, Karras")
        suffix = _SCHEDULE_SUFFIX[schedule]
        combined = value if value.endswith(suffix) else value + suffix
        if combined not in OURS_BY_A1111:
            raise FieldError(schedule_field, f"{schedule!r} does not apply to sampler {value!r}")
        value = combined
    if value in OURS_BY_A1111:
        return OURS_BY_A1111[value]
    if value in A1111_SAMPLER_NAMES:
        return value
    known = ", ".join(f"{a!r}" for a in OURS_BY_A1111)
    raise FieldError(field, f"unknown sampler {value!r}; choose one of {known}")
