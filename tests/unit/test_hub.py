"""Hub ids resolve through a real Hugging Face cache layout, offline."""

from __future__ import annotations

import pytest

from dsfm import hub


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its constants at import; point them at this cache
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def put_in_cache(root, repo_id, files):
    """The cache's own layout: models--org--name/{refs/main, snapshots/REV/...}."""
    rev = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_a_local_path_is_itself(tmp_path):
    assert hub.local_path(str(tmp_path)) == tmp_path


def test_a_cached_hub_id_resolves_offline(cache):
    snap = put_in_cache(cache, "org/tiny", {"config.json": "{}"})
    assert hub.local_path("org/tiny") == snap


def test_an_uncached_id_offline_names_the_id_and_the_cache(cache):
    with pytest.raises(hub.NotFound) as err:
        hub.local_path("org/missing")
    msg = str(err.value)
    assert "org/missing" in msg and str(cache) in msg and "HF_HUB_OFFLINE" in msg


def test_a_missing_path_that_is_no_hub_id_says_so(tmp_path):
    with pytest.raises(hub.NotFound, match="no such file"):
        hub.local_path(str(tmp_path / "a" / "b" / "c"))
