"""Launch-time safety of ``python app.py``, without starting a server: where the whole-app login
comes from, the warnings for a server reachable beyond this machine, and the model allow-list."""
from __future__ import annotations


import pytest

from metaaligner_core.errors import MetaAlignerError
from webapp import security as sec
from webapp.config import parse_args


def test_auth_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(sec.AUTH_ENV, raising=False)
    f = tmp_path / "auth"
    f.write_text("team:s3cret pass\nignored\n")
    assert parse_args(["--auth-file", str(f)]).auth == ("team", "s3cret pass")
    monkeypatch.setenv(sec.AUTH_ENV, "envuser:envpass")
    assert parse_args([]).auth == ("envuser", "envpass")
    assert parse_args(["--auth-file", str(f)]).auth == ("team", "s3cret pass")  # the file wins
    monkeypatch.delenv(sec.AUTH_ENV)
    assert parse_args(["--auth", "cli:pass"]).auth == ("cli", "pass")
    f.write_text("no-colon\n")
    with pytest.raises(SystemExit):
        parse_args(["--auth-file", str(f)])
    with pytest.raises(MetaAlignerError, match="--auth-file .*missing"):
        sec.read_auth(None, str(tmp_path / "missing"))


def test_warnings_beyond_loopback_and_for_share_without_auth():
    assert sec.launch_warnings("127.0.0.1", False, None) == []
    assert sec.launch_warnings("::1", False, None) == []
    [w] = sec.launch_warnings("0.0.0.0", False, None)
    assert "listening on 0.0.0.0 without --auth" in w and "docs/security.md" in w
    [w] = sec.launch_warnings("127.0.0.1", True, None)
    assert "--share opens a public gradio.live link and no --auth is set" in w
    [w] = sec.launch_warnings("192.168.1.5", False, ("u", "p"))
    assert "clear text unless a TLS reverse proxy" in w


def test_allow_list_and_credentials():
    allow = sec.ModelAllowList(["default", "openai-compatible:m@http://u:pw@10.0.0.2:8000/v1"], ["default"])
    assert allow.check("policy", "default") == "default"
    with pytest.raises(MetaAlignerError, match="not offered by this server"):
        allow.check("policy", "openai-compatible:x@http://evil.example/v1")
    # The page gets the configured URL without its password; the server maps it back.
    public = allow.public("openai-compatible:m@http://u:pw@10.0.0.2:8000/v1")
    assert "pw" not in public and allow.check("policy", public).endswith("u:pw@10.0.0.2:8000/v1")
    free = sec.ModelAllowList(["openai-compatible:m@http://10.0.0.2:8000/v1"], ["default"], allow_any=True)
    assert free.check("policy", "openai-compatible:other@http://10.0.0.2:8000/v1")  # a configured endpoint
    assert free.check("aligner", "some/hub-model") == "some/hub-model"
    for bad in ("openai-compatible:x@http://127.0.0.1:9999/v1", "openai-compatible:x@https://10.0.0.2/v1",
                "openai-compatible:x@http://user:pw@10.0.0.2:8000/v1"):
        with pytest.raises(MetaAlignerError) as e:
            free.check("policy", bad)
        assert "pw" not in str(e.value)
    assert sec.strip_credentials("see https://a:b@h/x?api_key=zz&q=1 and sk-abcdefghijklmnop") == \
        "see https://***@h/x?api_key=***&q=1 and ***"
