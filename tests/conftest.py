"""Shared test setup: 8 fake CPU devices (set before jax is imported) and session-scoped fixtures.

The tests' programs are tiny, so compiling them dominates the suite: LLVM's backend optimisation is turned off
(``--xla_backend_optimization_level=0``, as the notebook tests do), which made tests/test_detection.py 25%
faster (102 s -> 77 s on the 2-core machine) and changes no test's outcome. CLI subprocesses inherit it.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PDJAX_CACHE_DIR", "off")  # hermetic tests: no persistent compilation cache in ~/.cache

from pdjax import cpu_runtime  # noqa: E402  (imports no backend)

cpu_runtime.enable(devices=False)  # the CLI's YNNPACK kernels on XLA:CPU, before JAX starts

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PDJAX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PDJAX_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
