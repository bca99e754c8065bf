"""Is the Hub reachable (network.py)? The probe says why not (the Hub here is a closed local port: one refused
connection decides it) and is skipped when offline mode is set. What loaders then say: the offline tests of
integration/test_base_models.py and data/test_sources.py."""

from llama_expert.network import hub_offline_reason


def test_the_probe_reports_why(unreachable_hub):
    reason = hub_offline_reason()
    assert reason.startswith("cannot connect to 127.0.0.1:9")


def test_offline_mode_is_honoured_without_a_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline_reason() == "HF_HUB_OFFLINE is set"
