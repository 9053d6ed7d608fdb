"""The node's configuration: TOML in, frozen dataclasses out.

Every key is declared once, here, with its type and its check. An unknown
key, a wrong type or a bad value raises :class:`ConfigError` whose message
names the key (``node.port``), so that ``echonode check-config`` and a failed
start tell the administrator exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from echonode.bundles.device_spec import parse_device
from echonode.credentials import CredentialsError, load_credentials
from echonode.ops.httpauth import AUTH_MODES

DEFAULT_CONFIG_PATH = Path("/etc/echonode/echonode.toml")

_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}$")
#: ``sr.sop_class`` values (the keys of echonode.report.sop.SR_SOP_CLASS_UIDS; kept
#: here so that reading the config imports no DICOM library).
SR_SOP_CLASSES = ("comprehensive3d", "comprehensive", "enhanced")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Inference runtimes (echonode.bundles.runtime.MODES; kept here so that reading the
#: config never imports torch in the node process).
RUNTIME_MODES = (
    "auto",
    "eager",
    "jit",
    "bf16",
    "int8",
    "compile",
    "compile_bf16",
    "openvino",
    "openvino_bf16",
    "cuda",
)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the SCP (server side) or for a destination (client side)."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    #: CA bundle used to verify the peer's certificate.
    ca_file: str = ""
    #: Server side: ask for and verify a client certificate.
    require_client_cert: bool = False


@dataclass(frozen=True)
class NodeConfig:
    """The DICOM node: AE title, listening address, access and storage."""

    ae_title: str = "ECHONODE"
    host: str = "0.0.0.0"
    port: int = 11112
    storage_dir: str = "/var/lib/echonode"
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    max_associations: int = 16
    max_pdu: int = 131072
    #: Below this much free space new associations are rejected (transient)
    #: and C-STOREs on open ones answered 0xA700; 0 turns the guard off.
    min_free_disk_mb: int = 2048
    #: Seconds an idle association may stay open.
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    #: Processes that receive on ``port`` (SO_REUSEPORT: the kernel spreads
    #: new connections between them): 1 receives in the node's own process.
    #: ``max_associations`` applies to each.
    receivers: int = 1
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class StudyConfig:
    """When a study counts as complete."""

    stable_after_s: float = 60.0
    #: When set: a study is complete this many seconds after the association
    #: that brought it was released, none other being open for it (carts
    #: that send a whole exam in one association); ``stable_after_s`` still
    #: applies when the association was aborted or the node restarted.
    #: Unset (the default): ``stable_after_s`` alone.
    after_release_s: float | None = None
    #: How often the stability check runs.
    check_interval_s: float = 5.0


@dataclass(frozen=True)
class ModelsConfig:
    """Installed model bundles and the inference worker."""

    dir: str = "/var/lib/echonode/models"
    device: str = "auto"
    #: Views kept for the task models when a view bundle is installed.
    views: tuple[str, ...] = ("plax",)
    #: Clips per forward pass.
    batch_size: int = 8
    #: CPU threads for inference; 0 lets torch decide. With several workers
    #: on the CPU this is the total, split between them (0: the CPUs).
    threads: int = 0
    #: Inference worker processes, each claiming studies from the journal:
    #: with ``device`` auto or cuda, worker i runs on cuda:i (wrapping round
    #: the GPUs present); on the CPU they share ``threads``.
    workers: int = 1
    #: Inference runtime (echonode.bundles.runtime.MODES): auto (chosen by measurement at
    #: bundle load), or one named mode: eager, jit, bf16, int8, compile,
    #: compile_bf16, openvino, openvino_bf16, cuda.
    runtime: str = "auto"
    #: Attempts before a study is marked failed.
    max_attempts: int = 3
    #: Wall-clock limit for one study's inference.
    study_timeout_s: float = 1800.0
    #: Videos decoded at most per study (the rest are ignored and reported).
    max_videos: int = 64


@dataclass(frozen=True)
class SRConfig:
    """The structured report sent back."""

    #: Comprehensive 3D SR: the IHE AI Results IOD. Delivery falls back per
    #: destination to a class the PACS accepts (echonode.report.sop).
    sop_class: str = "comprehensive3d"
    #: A study the models cannot assess gets an SR that says so, each task
    #: "Undetermined" with the coded reason: silence would read as "absent".
    report_skipped: bool = True
    series_number: int = 9001
    institution_name: str = ""


@dataclass(frozen=True)
class DeliveryConfig:
    """Retries of the SR outbox."""

    retry_initial_s: float = 10.0
    retry_max_s: float = 900.0
    #: Transient failures tolerated before an SR is dead-lettered.
    max_attempts: int = 20
    check_interval_s: float = 2.0
    timeout_s: float = 30.0


#: Destination kinds: a DICOM peer (C-STORE) or a DICOMweb store (STOW-RS).
DESTINATION_KINDS = ("dimse", "stow")
#: HTTP authentication schemes of a STOW-RS destination ("" = none).
AUTH_SCHEMES = ("", "basic", "bearer")
#: Keys a credential might be written under: never in the config itself.
_CREDENTIAL_KEYS = frozenset({"user", "username", "password", "token", "secret", "api_key"})


@dataclass(frozen=True)
class Destination:
    """Where the SRs go: a DICOM peer (``kind = "dimse"``) or a DICOMweb store (``kind = "stow"``).

    A DIMSE destination is ``ae_title``, ``host`` and ``port`` (and
    ``tls``); a STOW-RS destination is ``url``, the DICOMweb base URL
    (``https://`` for TLS, with ``tls.ca_file`` when the server's CA is not
    in the system's store), and ``auth`` with the file that holds the
    credentials (``auth_file``). Each kind refuses the other's keys.
    """

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: TLSConfig = field(default_factory=TLSConfig)
    kind: str = "dimse"
    url: str = ""
    #: "" (none), "basic" (``user:password`` in auth_file) or "bearer" (a token in auth_file).
    auth: str = ""
    auth_file: str = ""


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus and health endpoints (off by default, loopback by default)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9108
    #: /health: the worker is not responding after this long without a heartbeat
    #: (it beats every second while idle and while processing).
    worker_stale_s: float = 15.0
    #: /health: the queue is stalled when studies have waited this long with
    #: none being processed.
    queue_stall_s: float = 600.0


@dataclass(frozen=True)
class StatusPageConfig:
    """The read-only status page, served at ``/status`` by the [metrics] endpoint (off by default)."""

    enabled: bool = False
    #: none | basic | bearer (echonode.ops.httpauth).
    auth: str = "none"
    #: basic: lines "user:password"; bearer: the token. Never the secret itself in this file.
    auth_file: str = ""
    #: Show each listed study's Accession Number (read from its first stored object).
    show_accession: bool = False
    #: Hours of throughput and latency shown.
    hours: int = 24
    #: Rows at most in each list (studies, dead letters, pending SRs).
    rows: int = 50


@dataclass(frozen=True)
class RetentionConfig:
    """Purge of delivered studies."""

    enabled: bool = False
    #: Delivered studies older than this are removed; 0 keeps them forever.
    max_age_days: float = 30.0
    #: Total stored size above which delivered studies go, oldest first; 0 = no cap.
    max_total_gb: float = 0.0
    check_interval_s: float = 3600.0


@dataclass(frozen=True)
class AgreementConfig:
    """Reading the sonographers' measurement SRs beside the models' results (``echonode agreement``)."""

    enabled: bool = True
    #: The label rules, a TOML file like echonode/measurements/label_rules.toml
    #: (``echonode-train labels --rules`` reads the same); empty: the default rules.
    rules: str = ""
    #: Seconds between two passes over the studies that received an SR.
    check_interval_s: float = 10.0
    #: The summary that ``status``, the metrics and the status page show is
    #: recomputed at most this often (it reads every study with a reference).
    summary_interval_s: float = 300.0


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    destinations: tuple[Destination, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    status_page: StatusPageConfig = field(default_factory=StatusPageConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    agreement: AgreementConfig = field(default_factory=AgreementConfig)
    #: Where the config came from (not a TOML key).
    source: str = field(default="<defaults>", compare=False)

    @property
    def storage_dir(self) -> Path:
        """``node.storage_dir`` as a path."""
        return Path(self.node.storage_dir)

    @property
    def journal_path(self) -> Path:
        """The journal's SQLite file in ``storage_dir``: the one name every process opens."""
        return self.storage_dir / "journal.sqlite"

    @property
    def models_dir(self) -> Path:
        return Path(self.models.dir)

    def destination(self, name: str) -> Destination:
        """Return the destination called ``name``.

        Raises
        ------
        KeyError
            When no destination has that name.
        """
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


# --------------------------------------------------------------------------
# Parsing: a small typed reader over the dataclasses above.


def _convert(value: Any, typ: Any, key: str) -> Any:
    origin = get_origin(typ)
    if origin is types.UnionType:
        # ``X | None``: a key that is absent stays None (TOML has no null).
        (typ,) = [t for t in get_args(typ) if t is not type(None)]
        origin = get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(typ, value, key)
    if origin is tuple:
        args = get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        item_type = args[0]
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover - programming error


def _build(cls: Any, table: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            known = ", ".join(sorted(fields))
            hint = ""
            if cls is Destination and name.lower() in _CREDENTIAL_KEYS:
                hint = "; credentials never go in the config: name a file with auth_file (and auth)"
            raise ConfigError(f"{key}: unknown key (known here: {known}){hint}")
        kwargs[name] = _convert(value, hints[name], key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{key}: required key is missing")
    return cls(**kwargs)


def _check_ae(value: str, key: str) -> None:
    if not _AE_TITLE.match(value) or value.strip() == "" or "\\" in value:
        raise ConfigError(f"{key}: not a valid AE title ({value!r}): 1-16 printable characters, no backslash")


def _check_port(value: int, key: str) -> None:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{key}: port must be 1-65535, got {value}")


def _check_positive(value: float, key: str, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_tls(tls: TLSConfig, key: str, *, server: bool) -> None:
    if not tls.enabled:
        return
    if server and not (tls.cert_file and tls.key_file):
        raise ConfigError(f"{key}.cert_file: TLS is enabled but cert_file/key_file are not set")
    if not server and not tls.ca_file:
        # Hostnames are not checked for DICOM peers (they are addressed by
        # IP and AE title), so trust must come from a CA the site chose,
        # never from the system store: any public certificate would do.
        raise ConfigError(f"{key}.ca_file: TLS to a destination needs the CA that signed its certificate")
    if tls.require_client_cert and not tls.ca_file:
        raise ConfigError(f"{key}.ca_file: require_client_cert needs a CA file to verify clients")
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}.{name}: no such file: {path}")
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError(f"{key}.key_file: cert_file and key_file go together")


def _check_status_page(cfg: Config) -> None:
    page = cfg.status_page
    if page.auth not in AUTH_MODES:
        raise ConfigError(f"status_page.auth: must be one of {', '.join(AUTH_MODES)}, got {page.auth!r}")
    if page.auth == "none" and page.auth_file:
        # Someone meant to protect the page: do not serve it open.
        raise ConfigError('status_page.auth_file: set, but status_page.auth is "none":'
                          ' set auth = "basic" or "bearer"')
    if not 1 <= page.hours <= 24 * 14:
        raise ConfigError(f"status_page.hours: must be 1-336, got {page.hours}")
    if not 1 <= page.rows <= 1000:
        raise ConfigError(f"status_page.rows: must be 1-1000, got {page.rows}")
    if not page.enabled:
        return
    if not cfg.metrics.enabled:
        raise ConfigError("status_page.enabled: the page is served by the [metrics] endpoint;"
                          " set metrics.enabled = true as well")
    if page.auth != "none":
        if not page.auth_file:
            raise ConfigError(f"status_page.auth_file: auth = {page.auth!r} needs the file that holds the"
                              f" {'user:password lines' if page.auth == 'basic' else 'token'}")
        try:
            load_credentials(page.auth, page.auth_file)
        except CredentialsError as exc:
            raise ConfigError(f"status_page.auth_file: {exc}") from None


def _check_stow(dest: Destination, key: str) -> None:
    """A STOW-RS destination: its URL, TLS files and credentials file."""
    for name in ("ae_title", "host"):
        if getattr(dest, name):
            raise ConfigError(f'{key}.{name}: not used by kind = "stow" (the url names the server)')
    if dest.port:
        raise ConfigError(f'{key}.port: not used by kind = "stow" (the url names the server)')
    if not dest.url:
        raise ConfigError(f'{key}.url: required for kind = "stow" (the DICOMweb base URL,'
                          ' e.g. "http://pacs:8042/dicom-web")')
    try:
        parts = urlsplit(dest.url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{key}.url: not a URL ({exc}): {dest.url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}.url: must be an http:// or https:// URL with a host, got {dest.url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key}.url: credentials never go in the config: name a file with auth_file (and auth)")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}.url: the DICOMweb base URL takes no query or fragment, got {dest.url!r}")
    tls = dest.tls
    if parts.scheme == "http":
        set_tls = [n for n in ("ca_file", "cert_file", "key_file") if getattr(tls, n)]
        if tls.enabled or set_tls:
            raise ConfigError(f"{key}.tls.{set_tls[0] if set_tls else 'enabled'}: TLS to a STOW-RS destination"
                              " comes with an https:// url")
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}.tls.{name}: no such file: {path}")
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError(f"{key}.tls.key_file: cert_file and key_file go together")
    if dest.auth not in AUTH_SCHEMES:
        raise ConfigError(f"{key}.auth: must be basic or bearer (or left out for none), got {dest.auth!r}")
    if bool(dest.auth) != bool(dest.auth_file):
        missing = "auth_file" if dest.auth else "auth"
        raise ConfigError(f"{key}.{missing}: auth (basic or bearer) and auth_file go together")
    if dest.auth:
        try:
            load_credentials(dest.auth, dest.auth_file, single=True)
        except CredentialsError as exc:
            raise ConfigError(f"{key}.auth_file: {exc}") from None


def validate(cfg: Config) -> Config:
    """Check values across keys; return ``cfg`` unchanged or raise ConfigError."""
    _check_node(cfg.node)
    _check_positive(cfg.study.stable_after_s, "study.stable_after_s", allow_zero=True)
    _check_positive(cfg.study.check_interval_s, "study.check_interval_s")
    if cfg.study.after_release_s is not None:
        _check_positive(cfg.study.after_release_s, "study.after_release_s", allow_zero=True)
    _check_models(cfg.models)
    if cfg.sr.sop_class not in SR_SOP_CLASSES:
        raise ConfigError(f"sr.sop_class: must be one of {', '.join(SR_SOP_CLASSES)}, got {cfg.sr.sop_class!r}")
    if not 1 <= cfg.sr.series_number <= 2**31 - 1:
        raise ConfigError(f"sr.series_number: out of range: {cfg.sr.series_number}")
    _check_delivery(cfg.delivery)
    _check_destinations(cfg.destinations)
    if cfg.logging.format not in LOG_FORMATS:
        raise ConfigError(f"logging.format: must be one of {', '.join(LOG_FORMATS)}, got {cfg.logging.format!r}")
    if cfg.logging.level.lower() not in LOG_LEVELS:
        raise ConfigError(f"logging.level: must be one of {', '.join(LOG_LEVELS)}, got {cfg.logging.level!r}")

    _check_port(cfg.metrics.port, "metrics.port")
    _check_positive(cfg.metrics.worker_stale_s, "metrics.worker_stale_s")
    _check_positive(cfg.metrics.queue_stall_s, "metrics.queue_stall_s")
    _check_status_page(cfg)
    r = cfg.retention
    _check_positive(r.max_age_days, "retention.max_age_days", allow_zero=True)
    _check_positive(r.max_total_gb, "retention.max_total_gb", allow_zero=True)
    _check_positive(r.check_interval_s, "retention.check_interval_s")
    _check_agreement(cfg.agreement)
    return cfg


def _check_node(n: NodeConfig) -> None:
    """``[node]``: identity, listening address, access lists, limits, timeouts, TLS."""
    _check_ae(n.ae_title, "node.ae_title")
    _check_port(n.port, "node.port")
    try:
        ipaddress.ip_address(n.host)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9.-]+$", n.host):
            raise ConfigError(f"node.host: not an address or host name: {n.host!r}") from None
    if not n.storage_dir:
        raise ConfigError("node.storage_dir: must not be empty")
    for i, aet in enumerate(n.allowed_calling_aets):
        _check_ae(aet, f"node.allowed_calling_aets[{i}]")
    for i, net in enumerate(n.allowed_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"node.allowed_networks[{i}]: not a CIDR network: {net!r}") from None
    if not 1 <= n.receivers <= 64:
        raise ConfigError(f"node.receivers: must be 1-64, got {n.receivers}")
    if not 1 <= n.max_associations <= 1000:
        raise ConfigError(f"node.max_associations: must be 1-1000, got {n.max_associations}")
    # PS3.8: 0 means unlimited; otherwise at least 4096 is sane for any peer.
    if n.max_pdu != 0 and not 4096 <= n.max_pdu <= 2**26:
        raise ConfigError(f"node.max_pdu: must be 0 (unlimited) or 4096-67108864, got {n.max_pdu}")
    _check_positive(n.min_free_disk_mb, "node.min_free_disk_mb", allow_zero=True)
    for name in ("network_timeout_s", "acse_timeout_s", "dimse_timeout_s"):
        _check_positive(getattr(n, name), f"node.{name}")
    _check_tls(n.tls, "node.tls", server=True)


def _check_models(m: ModelsConfig) -> None:
    """``[models]``."""
    if not m.dir:
        raise ConfigError("models.dir: must not be empty")
    try:
        parse_device(m.device)
    except ValueError as exc:
        raise ConfigError(f"models.device: {exc}") from None
    if not m.views:
        raise ConfigError("models.views: list at least one view (e.g. [\"plax\"])")
    if not 1 <= m.batch_size <= 1024:
        raise ConfigError(f"models.batch_size: must be 1-1024, got {m.batch_size}")
    _check_positive(m.threads, "models.threads", allow_zero=True)
    if not 1 <= m.workers <= 64:
        raise ConfigError(f"models.workers: must be 1-64, got {m.workers}")
    if m.runtime not in RUNTIME_MODES:
        raise ConfigError(f"models.runtime: must be one of {', '.join(RUNTIME_MODES)}, got {m.runtime!r}")
    if m.max_attempts < 1:
        raise ConfigError(f"models.max_attempts: must be >= 1, got {m.max_attempts}")
    _check_positive(m.study_timeout_s, "models.study_timeout_s")
    if m.max_videos < 1:
        raise ConfigError(f"models.max_videos: must be >= 1, got {m.max_videos}")


def _check_delivery(d: DeliveryConfig) -> None:
    """``[delivery]``: retries and deadlines."""
    _check_positive(d.retry_initial_s, "delivery.retry_initial_s")
    if d.retry_max_s < d.retry_initial_s:
        raise ConfigError("delivery.retry_max_s: must be >= delivery.retry_initial_s")
    if d.max_attempts < 1:
        raise ConfigError(f"delivery.max_attempts: must be >= 1, got {d.max_attempts}")
    _check_positive(d.check_interval_s, "delivery.check_interval_s")
    _check_positive(d.timeout_s, "delivery.timeout_s")


def _check_destinations(destinations: Sequence[Destination]) -> None:
    """``[[destinations]]``: unique names, and each kind's keys."""
    names: set[str] = set()
    for i, dest in enumerate(destinations):
        key = f"destinations[{i}]"
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", dest.name):
            raise ConfigError(f"{key}.name: letters, digits, '_', '-', '.' only, got {dest.name!r}")
        if dest.name in names:
            raise ConfigError(f"{key}.name: duplicate destination name {dest.name!r}")
        names.add(dest.name)
        if dest.kind not in DESTINATION_KINDS:
            raise ConfigError(f"{key}.kind: must be one of {', '.join(DESTINATION_KINDS)}, got {dest.kind!r}")
        if dest.kind == "stow":
            _check_stow(dest, key)
            continue
        for name in ("url", "auth", "auth_file"):
            if getattr(dest, name):
                raise ConfigError(f'{key}.{name}: only for kind = "stow" (this destination is DIMSE:'
                                  " ae_title, host, port)")
        for name in ("ae_title", "host"):
            if not getattr(dest, name):
                raise ConfigError(f"{key}.{name}: required key is missing")
        if dest.port == 0:
            raise ConfigError(f"{key}.port: required key is missing")
        _check_ae(dest.ae_title, f"{key}.ae_title")
        _check_port(dest.port, f"{key}.port")
        _check_tls(dest.tls, f"{key}.tls", server=False)


def _check_agreement(a: AgreementConfig) -> None:
    _check_positive(a.check_interval_s, "agreement.check_interval_s")
    _check_positive(a.summary_interval_s, "agreement.summary_interval_s", allow_zero=True)
    if a.rules:
        # Late: the rules name their concepts by pydicom's codes, and reading the
        # config imports no DICOM library unless a rules file is configured.
        from echonode.measurements.rules import RulesError, load_rules

        # Read now, so that a bad rules file stops the start with its key named.
        try:
            load_rules(a.rules)
        except RulesError as exc:
            raise ConfigError(f"agreement.rules: {exc}") from None


def parse_config(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from a parsed TOML document.

    Parameters
    ----------
    data : dict
        The TOML document as a dict (``tomllib.loads``).
    source : str
        Where it came from, for messages.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        On an unknown key, a wrong type or a bad value; the message names the key.
    """
    cfg = _build(Config, data, "")
    return validate(dataclasses.replace(cfg, source=source))


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate the TOML file at ``path``.

    Parameters
    ----------
    path : path-like or None
        The file; ``None`` resolves ``$ECHONODE_CONFIG`` then
        ``/etc/echonode/echonode.toml``.

    Raises
    ------
    ConfigError
        When the file is missing, not TOML, or any key is wrong.
    """
    resolved = resolve_config_path(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {resolved}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {resolved}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{resolved}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(resolved))


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """``path`` if given, else ``$ECHONODE_CONFIG``, else the system default."""
    if path:
        return Path(path)
    env = os.environ.get("ECHONODE_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


def to_toml(cfg: Config) -> str:
    """Render a config back to TOML (used to write demo and test configs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(type(v))

    lines: list[str] = []

    def table(name: str, obj: Any, header: str) -> None:
        scalars = []
        subtables = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None:
                continue  # unset: TOML has no null
            if dataclasses.is_dataclass(v):
                subtables.append((f.name, v))
            else:
                scalars.append(f"{f.name} = {value(v)}")
        lines.append(header)
        lines.extend(scalars)
        lines.append("")
        for sub_name, sub in subtables:
            table(f"{name}.{sub_name}", sub, f"[{name}.{sub_name}]")

    for f in dataclasses.fields(cfg):
        if f.name == "source":
            continue
        v = getattr(cfg, f.name)
        if f.name == "destinations":
            for dest in v:
                table("destinations", dest, "[[destinations]]")
        else:
            table(f.name, v, f"[{f.name}]")
    return "\n".join(lines)
