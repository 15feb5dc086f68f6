import pytest

import lspo


def test_isa_reporting_and_override():
    best = lspo.detected_isa()
    assert best in ("scalar", "avx2", "avx512")
    lspo.set_isa("scalar")
    try:
        assert lspo.active_isa() == "scalar"
    finally:
        lspo.set_isa("auto")
    assert lspo.active_isa() == best
    with pytest.raises(lspo.LspoError, match="unknown ISA"):
        lspo.set_isa("sse9")


def test_thread_count_is_settable():
    old = lspo.get_num_threads()
    lspo.set_num_threads(1)
    assert lspo.get_num_threads() == 1
    lspo.set_num_threads(old)
    with pytest.raises(lspo.LspoError):
        lspo.set_num_threads(0)
