"""A model or dataset that needs the Hugging Face hub, with no network: one line at once, after one
connection attempt, instead of the hub libraries' retries (about 30 s)."""
from __future__ import annotations

import socket

import pytest

from shared import hub
from shared.errors import UserError

MISSING_MODEL = "no-such-org-here/no-such-model"  # a hub name no cache holds
MISSING_DATASET = "no-such-org-here/no-such-dataset"


@pytest.fixture
def fresh_check(monkeypatch):
    """No offline variables, and the once-per-process answer forgotten before and after."""
    for name in (*hub.OFFLINE_ENV, "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


@pytest.fixture
def no_network(monkeypatch, fresh_check):
    """Every name lookup fails, as on a machine without a network; the list counts the lookups."""
    lookups: list[str] = []

    def fail(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    return lookups


def test_a_hub_model_without_network_fails_at_once(no_network):
    from shared.models import load_model

    with pytest.raises(UserError) as e:
        load_model(MISSING_MODEL, "cpu")
    assert str(e.value) == (f"model '{MISSING_MODEL}' needs the Hugging Face hub, which cannot be reached from "
                            "here: use a local folder or the packaged smollm2-135m (offline)")
    assert no_network == ["huggingface.co"]  # the check's one lookup; the libraries tried none


def test_a_hub_dataset_without_network_fails_at_once(no_network):
    from harvest.data import open_documents

    with pytest.raises(UserError) as e:
        open_documents(MISSING_DATASET, "train", "text", 0, False, 10)
    assert str(e.value) == (f"dataset '{MISSING_DATASET}' needs the Hugging Face hub, which cannot be reached "
                            "from here: use a local folder or the packaged shakespeare (offline)")
    assert no_network == ["huggingface.co"]


def test_offline_mode_set_by_the_user_tries_no_connection(no_network, monkeypatch):
    from harvest.data import open_documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="needs the Hugging Face hub, and HF_HUB_OFFLINE is set: use a local"):
        open_documents(MISSING_DATASET, "train", "text", 0, False, 10)
    assert no_network == []


def test_the_check_runs_once_per_process(no_network):
    assert not hub.hub_reachable() and not hub.hub_reachable()
    assert len(no_network) == 1


def test_a_closed_port_is_unreachable(fresh_check, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.hub_address() == ("127.0.0.1", port)
        assert not hub.hub_reachable()


def test_a_listening_hub_is_reachable(fresh_check, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        assert hub.hub_reachable()


def test_the_check_connects_to_the_proxy_when_one_is_set(fresh_check, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub.hub_address() == ("proxy.example", 3128)


def test_a_missing_model_folder_is_named(fresh_check, tmp_path):
    from shared.models import load_model

    with pytest.raises(UserError, match=f"model folder {tmp_path}/absent not found"):
        load_model(str(tmp_path / "absent"), "cpu")
