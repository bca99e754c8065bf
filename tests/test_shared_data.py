"""The shared data folder (``<repo>/../shared/data``): a missing one skips naming the path, and fails on CI."""

from pathlib import Path

import pytest

MISSING = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "no-such-data-set"


def test_missing_shared_data_skips_naming_the_path(shared_data, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        shared_data("no-such-data-set")
    message = str(info.value)
    assert message.endswith(f"shared data missing: {MISSING}")
    assert message.startswith("test_missing_shared_data_skips_naming_the_path: ")  # which test skipped


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_missing_shared_data_fails_when_ci_is_set(shared_data, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        shared_data("no-such-data-set")


@pytest.mark.parametrize("value", ["", "false", "0"])
def test_ci_switched_off_still_skips(shared_data, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception):
        shared_data("no-such-data-set")
