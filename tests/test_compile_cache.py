"""The CLI's persistent compilation cache switch (pdjax.compile_cache); no compile happens here.

The speed-up itself is measured by experiments/bench_compile_cache.py (fresh processes: a cache folder set
after this test process has compiled would not be picked up reliably)."""

import jax

from pdjax import compile_cache


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.cache_dir() == tmp_path / "c"
    for off in ("off", "", "0", "none"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.cache_dir() is None
        assert compile_cache.enable() is None
    monkeypatch.delenv(compile_cache.ENV)
    assert compile_cache.cache_dir() == compile_cache.DEFAULT.expanduser()


def test_enable_sets_jax_config_and_respects_a_user_setting(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    assert not before  # conftest disables the cache for the tests
    try:
        assert compile_cache.enable(tmp_path / "xla") == tmp_path / "xla"
        assert (tmp_path / "xla").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        # a folder already configured (by the user or an earlier call) is kept
        assert compile_cache.enable(tmp_path / "other") == tmp_path / "xla" and not (tmp_path / "other").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_unwritable_folder_disables_without_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert compile_cache.enable(blocker / "xla") is None
    assert not jax.config.jax_compilation_cache_dir
