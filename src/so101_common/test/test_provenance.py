"""Provenance names the code's commit, not the working directory's."""
from __future__ import annotations

import os

from so101_common import provenance


def test_commit_is_the_codes_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert provenance.git_commit() == "unknown"  # a scratch folder outside any checkout
    expected = provenance.git_commit(os.path.dirname(provenance.__file__))
    record = provenance.provenance()
    assert record["commit"] == expected
    assert set(record) == {"commit", "machine", "date_utc"} and record["machine"]
