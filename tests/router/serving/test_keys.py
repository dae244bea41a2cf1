"""API keys: the key file keeps hashes only, takes effect without a restart, and refuses rather
than guesses."""
from __future__ import annotations

import json
import stat

import pytest

from router.core.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable
from router.serving.keys import OPEN, KeyFile, Limits, require


def test_a_created_key_authenticates_and_only_its_hash_is_stored(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    assert not keys.enabled()
    rec, token = keys.create("billing-app", tenant="billing", scopes=("generate", "route"),
                             limits=Limits(requests_per_s=5, budget=10.0, budget_period="month"))
    assert keys.enabled() and token.startswith(f"crk_{rec.id}_") and len(token) == 4 + 12 + 1 + 43
    text = (tmp_path / "keys.json").read_text()
    assert token not in text and token.split("_")[2] not in text and rec.sha256 in text
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    caller = keys.authenticate(token)
    assert (caller.name, caller.tenant, caller.key.scopes) == ("billing-app", "billing", ("route", "generate"))
    assert caller.limits == Limits(requests_per_s=5, budget=10.0, budget_period="month")
    require(caller, "route")
    with pytest.raises(PermissionDenied, match="'feedback' scope"):
        require(caller, "feedback")
    require(OPEN, "admin")                      # an open server allows everything


def test_admin_implies_every_scope(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    _, token = keys.create("ops", scopes=("admin",))
    caller = keys.authenticate(token)
    for scope in ("route", "generate", "feedback", "onboard", "admin"):
        require(caller, scope)


@pytest.mark.parametrize("token", [None, "", "sk-openai-style", "crk_0123456789ab_short",
                                   "crk_0123456789ab_" + "A" * 43])
def test_missing_malformed_and_unknown_keys_are_unauthenticated(tmp_path, token):
    keys = KeyFile(tmp_path / "keys.json")
    keys.create("app")
    with pytest.raises(Unauthenticated) as e:
        keys.authenticate(token)
    assert not token or token not in str(e.value)       # a key never comes back in a message


def test_a_right_id_with_a_wrong_secret_is_refused(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    rec, token = keys.create("app")
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(Unauthenticated, match="unknown API key"):
        keys.authenticate(forged)


def test_revocation_reaches_a_running_reader_without_a_restart(tmp_path):
    path = tmp_path / "keys.json"
    server_view, cli = KeyFile(path), KeyFile(path)     # the server's instance and the CLI's
    rec, token = cli.create("app")
    assert server_view.authenticate(token).name == "app"
    cli.revoke("app")                                  # by name
    with pytest.raises(Unauthenticated, match="revoked"):
        server_view.authenticate(token)
    # A new key under the same name is a new key; the old one stays revoked.
    rec2, token2 = cli.create("app")
    assert rec2.id != rec.id and server_view.authenticate(token2).key.id == rec2.id
    with pytest.raises(Unauthenticated):
        server_view.authenticate(token)
    assert [k.active for k in server_view.keys()] == [False, True]


def test_a_file_with_every_key_revoked_refuses_everyone_rather_than_opening(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    rec, token = keys.create("only")
    keys.revoke(rec.id)
    assert keys.enabled()
    with pytest.raises(Unauthenticated):
        keys.authenticate(token)


def test_bad_names_scopes_and_duplicates_are_refused(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    keys.create("app")
    with pytest.raises(InvalidArgument, match="already named"):
        keys.create("app")
    with pytest.raises(InvalidArgument, match="scopes"):
        keys.create("other", scopes=("route", "root"))
    with pytest.raises(InvalidArgument, match="key name"):
        keys.create("has space")
    with pytest.raises(InvalidArgument, match="looks like a key id"):
        keys.create("0123456789ab")
    with pytest.raises(InvalidArgument, match="requests_per_s"):
        Limits(requests_per_s=0)
    with pytest.raises(InvalidArgument, match="period"):
        Limits(budget=1, budget_period="week")
    with pytest.raises(NotFound):
        keys.revoke("nobody")


def test_a_damaged_key_file_refuses_everyone(tmp_path):
    path = tmp_path / "keys.json"
    keys = KeyFile(path)
    _, token = keys.create("app")
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data)[:-7])            # an editor's half-saved file
    with pytest.raises(Unavailable, match="unreadable"):
        KeyFile(path).authenticate(token)


def test_a_key_file_that_disappears_refuses_everyone_instead_of_opening(tmp_path):
    path = tmp_path / "keys.json"
    server_view = KeyFile(path)
    assert not server_view.enabled()                   # no file yet: an open server
    _, token = KeyFile(path).create("app")
    assert server_view.enabled() and server_view.authenticate(token).name == "app"
    path.rename(tmp_path / "keys.json.bak")            # an operator moves it aside to edit it
    assert server_view.enabled()
    with pytest.raises(Unavailable, match="missing"):
        server_view.authenticate(token)
    (tmp_path / "keys.json.bak").rename(path)
    assert server_view.authenticate(token).name == "app"


def test_required_keys_refuse_everyone_while_the_file_is_missing(tmp_path):
    keys = KeyFile(tmp_path / "keys.json", required=True)
    assert keys.enabled()
    with pytest.raises(Unavailable, match="missing"):
        keys.authenticate("crk_0123456789ab_" + "A" * 43)


def test_an_unreadable_key_file_is_unavailable_not_a_crash(tmp_path):
    path = tmp_path / "keys.json"
    _, token = KeyFile(path).create("app")
    path.unlink()
    path.mkdir()                                        # reading a folder: an OSError other than "missing"
    with pytest.raises(Unavailable, match="cannot be read"):
        KeyFile(path).authenticate(token)
