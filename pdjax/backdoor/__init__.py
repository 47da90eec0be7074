"""Backdoor attacks on diffusion models (SPEC 2): the trigger/target library and the attacks."""

from pdjax.backdoor.triggers import (
    TARGETS,
    TRIGGERS,
    TROJ_TRIGGERS,
    TrojTrigger,
    get_target,
    get_trigger,
    get_troj_trigger,
    trigger_mask,
)

__all__ = [
    "TARGETS", "TRIGGERS", "TROJ_TRIGGERS", "TrojTrigger", "get_target", "get_trigger", "get_troj_trigger",
    "trigger_mask",
]
