"""Backdoor defences: trigger-shift scale, trigger inversion, detection and removal (SPEC 3-5)."""
