"""`caprouter keys create|list|revoke`: the key is printed once, to stdout, and never stored."""
from __future__ import annotations

import json

from router.cli import main
from router.serving.keys import KeyFile


def test_create_list_and_revoke(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "create", "billing", "--keys-file", str(path), "--scopes", "route,feedback",
                 "--rps", "5", "--budget", "2.5", "--period", "month"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("crk_") and "not shown again" in err and token not in err
    assert token not in path.read_text()
    caller = KeyFile(path).authenticate(token)
    assert caller.key.scopes == ("route", "feedback") and caller.limits.budget == 2.5

    assert main(["keys", "list", "--keys-file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "billing" in listing and "route,feedback" in listing and "5 rps" in listing and "active" in listing
    assert token not in listing
    assert main(["keys", "list", "--keys-file", str(path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "billing" and "sha256" not in row

    assert main(["keys", "revoke", "billing", "--keys-file", str(path)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert not KeyFile(path).keys()[0].active
    # Key changes are audited beside the key file.
    actions = [json.loads(x)["action"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert actions == ["key.create", "key.revoke"]


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "create", "x", "--keys-file", str(path), "--scopes", "root"]) == 2
    assert "scopes must be some of" in capsys.readouterr().err
    assert main(["keys", "revoke", "nobody", "--keys-file", str(path)]) == 2
    assert "no key with id or name" in capsys.readouterr().err
