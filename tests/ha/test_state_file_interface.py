"""The file backend behind the StateBackend interface: the default, unshared, importable as before."""

from __future__ import annotations

from fixtures_stores import store_settings
from tokensmith.state import STATE_BACKENDS, ClientState, StateStore, build_state_backend


def test_the_default_backend_is_the_state_dir(tmp_path):
    settings = store_settings(tmp_path, source={"type": "env"})
    store = build_state_backend(settings)
    assert type(store) is StateStore and not store.shared and store.directory == tmp_path
    assert set(STATE_BACKENDS) == {"file", "vault", "dynamodb"}


def test_load_all_returns_every_readable_client_and_sets_a_damaged_file_aside(tmp_path):
    store = StateStore(tmp_path / "state")
    store.prepare()
    store.save("a", ClientState(access_token="t-a", expires_at=5.0))
    store.save("b", ClientState(access_token="t-b", expires_at=6.0))
    (tmp_path / "state" / "c.json").write_text("{not json")
    states = store.load_all()
    assert sorted(states) == ["a", "b"] and states["b"].access_token == "t-b"
    assert any(path.name.startswith("c.json.corrupt-") for path in (tmp_path / "state").iterdir())
    store.append_audit({"client": "a"})  # the audit log file is the file backend's audit store
    assert sorted(path.name for path in (tmp_path / "state").glob("*.json")) == ["a.json", "b.json"]
