"""Config: every key typed and checked, errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from echonode.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    resolve_config_path,
    to_toml,
)
from tests.conftest import REPO, run_cli

EXAMPLE = REPO / "etc" / "echonode.toml"


def test_defaults_are_valid() -> None:
    cfg = parse_config({})
    assert cfg.node.ae_title == "ECHONODE"
    assert cfg.node.port == 11112
    assert cfg.node.max_pdu == 131072
    assert cfg.study.stable_after_s == 60.0
    assert cfg.models.device == "auto"
    assert cfg.models.runtime == "auto"
    assert cfg.sr.sop_class == "comprehensive3d"


def test_journal_path_is_in_storage_dir(tmp_path: Path) -> None:
    # The one spelling of the journal's file: node, worker and CLI open it
    # through this property, and an existing node's journal has this name.
    assert parse_config({}).journal_path == Path("/var/lib/echonode/journal.sqlite")
    cfg = parse_config({"node": {"storage_dir": str(tmp_path / "s")}})
    assert cfg.journal_path == tmp_path / "s" / "journal.sqlite"


def test_example_file_parses_and_documents_every_key() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg == parse_config({})  # the example shows the defaults
    text = EXAMPLE.read_text()
    # Every key of every table appears in the example (commented or not).
    defaults = Config()
    for table in ("node", "study", "models", "sr", "delivery", "logging", "metrics", "retention", "agreement"):
        for key in vars(getattr(defaults, table)):
            if key == "tls":
                assert f"[{table}.tls]" in text
                continue
            assert f"{key} =" in text, f"{table}.{key} is not documented in etc/echonode.toml"
    for key in ("name", "ae_title", "host", "port", "kind", "url", "auth", "auth_file"):
        assert f"# {key} =" in text


def test_contract_example_parses() -> None:
    doc = """
[node]
ae_title = "ECHONODE"
host = "0.0.0.0"
port = 11112
storage_dir = "/var/lib/echonode"
allowed_calling_aets = []
allowed_networks = []
max_associations = 16
max_pdu = 131072
[study]
stable_after_s = 60
[models]
dir = "/var/lib/echonode/models"
device = "auto"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
[logging]
format = "auto"
level = "info"
"""
    cfg = parse_config(tomllib.loads(doc))
    assert cfg.destination("pacs").port == 104
    assert cfg.study.stable_after_s == 60.0


@pytest.mark.parametrize(
    "doc, key",
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": "104"}}, "node.port"),
        ({"node": {"prot": 104}}, "node.prot"),
        ({"nodes": {}}, "nodes"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title"),
        ({"node": {"allowed_networks": ["10.0.0.0/33"]}}, "node.allowed_networks[0]"),
        ({"node": {"allowed_calling_aets": [""]}}, "node.allowed_calling_aets[0]"),
        ({"node": {"max_pdu": 100}}, "node.max_pdu"),
        ({"node": {"tls": {"enabled": True}}}, "node.tls.cert_file"),
        ({"node": {"tls": {"enabled": True, "cert_file": "/nope.pem", "key_file": "/nope.key"}}}, "node.tls.cert_file"),
        ({"study": {"stable_after_s": -1}}, "study.stable_after_s"),
        ({"models": {"device": "tpu"}}, "models.device"),
        ({"models": {"views": []}}, "models.views"),
        ({"sr": {"sop_class": "basic"}}, "sr.sop_class"),
        ({"delivery": {"retry_max_s": 1.0, "retry_initial_s": 5.0}}, "delivery.retry_max_s"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h"}]}, "destinations[0].port"),
        (
            {
                "destinations": [
                    {"name": "p", "ae_title": "PACS", "host": "h", "port": 104},
                    {"name": "p", "ae_title": "PACS2", "host": "h", "port": 105},
                ]
            },
            "destinations[1].name",
        ),
        ({"destinations": {"name": "p"}}, "destinations"),
        (
            {"destinations": [{"name": "p", "ae_title": "PACS", "host": "h", "port": 104, "tls": {"enabled": True}}]},
            "destinations[0].tls.ca_file",
        ),
        ({"logging": {"format": "xml"}}, "logging.format"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"node": {"max_associations": True}}, "node.max_associations"),
    ],
)
def test_bad_values_name_the_key(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert str(err.value).startswith(key + ":"), str(err.value)


def _stow(**keys: object) -> dict:
    return {"destinations": [{"name": "vna", "kind": "stow", "url": "http://127.0.0.1:8042/dicom-web", **keys}]}


@pytest.mark.parametrize(
    "doc, key, words",
    [
        ({"destinations": [{"name": "vna", "kind": "stow"}]}, "destinations[0].url", "required for kind"),
        ({"destinations": [{"name": "vna", "kind": "dicomweb", "url": "http://h/dw"}]}, "destinations[0].kind",
         "dimse, stow"),
        (_stow(url="ftp://h/dicom-web"), "destinations[0].url", "http:// or https://"),
        (_stow(url="http:///dicom-web"), "destinations[0].url", "with a host"),
        (_stow(url="http://h:port/dicom-web"), "destinations[0].url", "not a URL"),
        (_stow(url="http://user:pw@h/dicom-web"), "destinations[0].url", "credentials never go in the config"),
        (_stow(url="http://h/dicom-web?x=1"), "destinations[0].url", "no query"),
        (_stow(password="s3cret"), "destinations[0].password", "credentials never go in the config"),
        (_stow(token="abc"), "destinations[0].token", "name a file with auth_file"),
        (_stow(auth="basic"), "destinations[0].auth_file", "go together"),
        (_stow(auth_file="/etc/x"), "destinations[0].auth", "go together"),
        (_stow(auth="digest", auth_file="/etc/x"), "destinations[0].auth", "basic or bearer"),
        (_stow(auth="basic", auth_file="/nonexistent/vna.auth"), "destinations[0].auth_file", "no such file"),
        (_stow(ae_title="VNA"), "destinations[0].ae_title", 'not used by kind = "stow"'),
        (_stow(port=8042), "destinations[0].port", 'not used by kind = "stow"'),
        (_stow(tls={"ca_file": "/etc/ssl/certs/ca-certificates.crt"}), "destinations[0].tls.ca_file",
         "comes with an https:// url"),
        (_stow(url="https://h/dw", tls={"ca_file": "/nonexistent/ca.pem"}), "destinations[0].tls.ca_file",
         "no such file"),
        ({"destinations": [{"name": "p", "ae_title": "PACS", "host": "h", "port": 104, "url": "http://h/dw"}]},
         "destinations[0].url", 'only for kind = "stow"'),
        ({"destinations": [{"name": "p", "kind": "dimse", "host": "h", "port": 104}]}, "destinations[0].ae_title",
         "required key is missing"),
    ],
)
def test_bad_stow_destinations_name_the_key(doc: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert str(err.value).startswith(key + ":"), str(err.value)
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "auth, text, mode, words",
    [
        ("basic", "no-colon-here", 0o600, "line 1 is not user:password"),
        ("basic", ":pw", 0o600, "line 1 is not user:password"),
        ("basic", "a:b\nc:d", 0o600, "must hold one user:password line, found 2"),
        ("basic", "", 0o600, "holds no user:password line"),
        ("bearer", "two words", 0o600, "must not contain spaces"),
        ("bearer", "token", 0o644, "readable by every user (mode 644): chmod o-r it"),
    ],
)
def test_bad_credentials_files_are_named_never_quoted(tmp_path: Path, auth: str, text: str, mode: int,
                                                      words: str) -> None:
    path = tmp_path / "vna.auth"
    path.write_text(text)
    path.chmod(mode)
    with pytest.raises(ConfigError) as err:
        parse_config(_stow(auth=auth, auth_file=str(path)))
    message = str(err.value)
    assert message.startswith("destinations[0].auth_file: "), message
    assert words in message and str(path) in message, message
    for secret in ("no-colon-here", "pw", "two words"):
        if secret in text:
            assert secret not in message.replace(str(path), "")


def test_a_stow_destination_parses(tmp_path: Path) -> None:
    path = tmp_path / "vna.auth"
    path.write_text("echonode:s3cret\n")
    path.chmod(0o640)
    cfg = parse_config(_stow(url="https://vna.example.org/dicom-web", auth="basic", auth_file=str(path)))
    dest = cfg.destination("vna")
    assert (dest.kind, dest.url, dest.auth, dest.ae_title, dest.port) == (
        "stow", "https://vna.example.org/dicom-web", "basic", "", 0)
    assert "s3cret" not in repr(cfg)  # the config holds the file's name, never what it holds
    out = tmp_path / "c.toml"
    out.write_text(to_toml(cfg))
    assert load_config(out) == cfg
    assert parse_config({}).destinations == ()


def test_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "node": {"allowed_networks": ["127.0.0.0/8"], "allowed_calling_aets": ["CART1"]},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        }
    )
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHONODE_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("/etc/echonode/echonode.toml")
    monkeypatch.setenv("ECHONODE_CONFIG", str(tmp_path / "x.toml"))
    assert resolve_config_path(None) == tmp_path / "x.toml"
    assert resolve_config_path("given.toml") == Path("given.toml")


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("--config", str(EXAMPLE), "check-config")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = 0\n')
    res = run_cli("--config", str(bad), "check-config")
    assert res.returncode == 2
    assert "node.port" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("check-config", env={"ECHONODE_CONFIG": str(tmp_path / "nope.toml")})
    assert res.returncode == 2 and "not found" in res.stderr
