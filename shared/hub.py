"""Whether the Hugging Face hub can be reached, found out in a few seconds before any download.

Without a network the hub libraries retry every request with back-off, so a model name that needs
the hub failed only after about 30 s. `hub_reachable()` opens one TCP connection to the hub's host
(or to the proxy configured for it) with a short timeout, once per process; when it fails, models
load in the libraries' offline mode (a copy in the local hub cache still loads, with no retries)
and anything else that needs the hub fails at once in one line (`unreachable`).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 3.0
"""How long the check waits for the connection (name resolution included)."""
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_requested() -> bool:
    """The user set the hub libraries' offline mode (HF_HUB_OFFLINE=1 or its older names)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV)


def hub_address() -> tuple[str, int]:
    """(host, port) the hub's requests connect to first: HF_ENDPOINT's, or its proxy's."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host = url.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxied.hostname or host, proxied.port or 80
    return host, url.port or (80 if url.scheme == "http" else 443)


def connect(address: tuple[str, int], timeout: float) -> None:
    """Open and close one TCP connection; an OSError when that is impossible."""
    socket.create_connection(address, timeout=timeout).close()


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when offline mode is requested, or when no connection to the hub opens within
    TIMEOUT_S. Name resolution has no timeout of its own, so the attempt runs in a thread."""
    if offline_requested():
        return False
    done: list[bool] = []

    def attempt() -> None:
        try:
            connect(hub_address(), TIMEOUT_S)
            done.append(True)
        except OSError:
            done.append(False)

    thread = threading.Thread(target=attempt, name="hub-check", daemon=True)
    thread.start()
    thread.join(TIMEOUT_S + 0.5)
    return bool(done and done[0])


def unreachable(what: str, packaged: str) -> str:
    """The one line for something (model 'gelu-2l') that needs the hub when it cannot be reached."""
    why = "and HF_HUB_OFFLINE is set" if offline_requested() else "which cannot be reached from here"
    return f"{what} needs the Hugging Face hub, {why}: use a local folder or the packaged {packaged} (offline)"


@contextmanager
def hub_offline() -> Iterator[None]:
    """The hub libraries in offline mode while the block runs (local cache only, no retries)."""
    import huggingface_hub.constants as constants

    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    datasets_config = sys.modules.get("datasets.config")
    saved_datasets = getattr(datasets_config, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries that read it when they are imported
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved_datasets
