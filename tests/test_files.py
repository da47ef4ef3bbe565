"""runtime/files.py: atomic writes that leave no temporary file and give the mode a plain open() would."""

import json
import math
import os
import stat

import pytest

from runtime.files import atomic_write_json, atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_records_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x\n")
        atomic_write_json(tmp_path / "b.json", {"v": 1})
        assert os.umask(umask) == umask  # the writes put the umask back as they found it
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]  # no temporary file left


def test_json_is_strict_with_non_finite_numbers_as_null(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"loss": math.nan, "inf": [math.inf, 1.5], "ok": 2.0})
    assert json.loads((tmp_path / "s.json").read_text()) == {"loss": None, "inf": [None, 1.5], "ok": 2.0}
