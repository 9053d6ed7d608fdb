"""DICOMweb: the session (credentials, deadlines), QIDO-RS through ``dicomweb-client``, WADO-RS streamed to disk.

Credentials come from a file (``--auth-file``) or an environment variable
(``$ECHONODE_DICOMWEB_AUTH`` unless ``--auth-env`` names another), never
from the command line, where ``ps`` and shell history would show them. The
value is ``basic USER:PASSWORD``, ``bearer TOKEN``, or ``USER:PASSWORD``.

QIDO-RS searches go through :class:`dicomweb_client.DICOMwebClient`. WADO-RS
retrieval uses the same session but reads the multipart answer itself, one
part at a time straight into a temp file: the client's retrieve methods hand
back parsed data sets, which would be written back re-encoded (not the
PACS's bytes), held whole in memory, and would hide an instance cut short
(pydicom reads a truncated object leniently). Read as bytes, a fetched file
is the PACS's file, and the node's header check finds a short one.

Query URLs can carry a patient ID (``--studies``) and exceptions quote
URLs: errors are reported by type and HTTP status only, and the HTTP
libraries' own loggers stay at WARNING.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from echonode.ops.logs import get_logger

from .errors import FetchError, UsageError

log = get_logger(__name__)

DEFAULT_AUTH_ENV = "ECHONODE_DICOMWEB_AUTH"
#: Answers larger than this for one instance are refused (an endless stream).
MAX_PART_BYTES = 4 * 2**30
_CHUNK = 1 << 20

for _name in ("dicomweb_client", "urllib3", "requests"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def read_auth(auth_file: str | os.PathLike[str] | None, env_name: str | None) -> tuple[str, str] | None:
    """The credentials: ``("basic", "USER:PASSWORD")``, ``("bearer", TOKEN)`` or None.

    Raises
    ------
    UsageError
        For an unreadable file or a value in none of the forms; the message
        never quotes the value.
    """
    if auth_file:
        where = f"--auth-file {auth_file}"
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{where}: cannot read it ({type(exc).__name__})") from None
        try:
            if Path(auth_file).stat().st_mode & 0o077:
                log.warning("fetch.auth_file_readable_by_others", path=str(auth_file))
        except OSError:
            pass
    else:
        name = env_name or DEFAULT_AUTH_ENV
        where = f"${name}"
        if name not in os.environ:
            if env_name:
                raise UsageError(f"--auth-env {env_name}: the variable is not set")
            return None
        text = os.environ[name]
    value = text.strip()
    kind, _, rest = value.partition(" ")
    if kind.lower() == "bearer" and rest.strip():
        return "bearer", rest.strip()
    if kind.lower() == "basic" and ":" in rest:
        return "basic", rest.strip()
    if " " not in value and ":" in value:
        return "basic", value
    raise UsageError(f"{where}: expected 'basic USER:PASSWORD', 'bearer TOKEN' or 'USER:PASSWORD'")


def make_session(auth: tuple[str, str] | None) -> Any:
    """A requests session carrying the credentials."""
    import requests  # the train extra (dicomweb-client brings it); absent on a node-only install

    session = requests.Session()
    if auth is not None:
        kind, value = auth
        if kind == "bearer":
            session.headers["Authorization"] = f"Bearer {value}"
        else:
            user, _, password = value.partition(":")
            session.auth = (user, password)
    return session


def make_client(url: str, session: Any, timeout_s: float) -> Any:
    """A QIDO-RS client on ``session``, with fetch's deadline and without its own retries (fetch backs off)."""
    from dicomweb_client import DICOMwebClient  # the train extra; absent on a node-only install

    try:
        client = DICOMwebClient(url.rstrip("/"), session=session, timeout=(timeout_s, timeout_s))
    except ValueError:
        raise UsageError(f"--dicomweb {url}: not a URL the client accepts (http(s)://HOST[:PORT]/PATH)") from None
    client.set_http_retry_params(retry=False)
    return client


def web_error(exc: BaseException, what: str) -> FetchError:
    """The :class:`FetchError` for an HTTP failure, by type and status only (never the URL)."""
    import requests  # the train extra (dicomweb-client brings it); absent on a node-only install

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return FetchError(f"{what}: HTTP {code}: the DICOMweb server refused the credentials", fatal=True)
        if code in (408, 429, 502, 503, 504):
            return FetchError(f"{what}: HTTP {code}: server busy or unavailable", busy=True)
        if code >= 500:
            return FetchError(f"{what}: HTTP {code}: server error", transient=True)
        return FetchError(f"{what}: HTTP {code}", transient=False)
    if isinstance(exc, requests.Timeout):
        return FetchError(f"{what}: no answer within the deadline", busy=True)
    if isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return FetchError(f"{what}: connection failed or dropped ({type(exc).__name__})", busy=True)
    if isinstance(exc, ValueError):  # a malformed JSON or multipart answer
        return FetchError(f"{what}: malformed answer ({type(exc).__name__})", transient=True)
    return FetchError(f"{what}: {type(exc).__name__}", transient=True)


def _boundary(content_type: str) -> bytes | None:
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        return None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode()
    return None


def retrieve_instance(session: Any, base_url: str, study_uid: str, series_uid: str, sop_uid: str, tmp_dir: Path,
                      timeout_s: float, on_chunk: Callable[[int], Any] | None = None) -> Iterator[Path]:
    """WADO-RS one instance as the server holds it; yields each part as a temp file in ``tmp_dir``.

    The caller owns (moves or deletes) every yielded file; a part cut short
    by the end of the answer raises and leaves no file.

    Raises
    ------
    FetchError
    """
    import requests  # the train extra (dicomweb-client brings it); absent on a node-only install

    url = f"{base_url.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    what = f"WADO-RS {sop_uid}"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s))
        response.raise_for_status()
    except (requests.RequestException, ValueError) as exc:
        raise web_error(exc, what) from None
    with response:
        boundary = _boundary(response.headers.get("Content-Type", ""))
        try:
            chunks = response.iter_content(chunk_size=_CHUNK)
            if boundary is None:
                yield from _single_part(chunks, tmp_dir, on_chunk)
            else:
                yield from _parts(chunks, boundary, tmp_dir, on_chunk)
        except (requests.RequestException, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, requests.RequestException) and exc.errno is not None:
                raise
            raise web_error(exc, what) from None


def _new_part(tmp_dir: Path) -> tuple[Any, Path]:
    fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
    return os.fdopen(fd, "wb"), Path(name)


def _single_part(chunks: Iterator[bytes], tmp_dir: Path, on_chunk: Callable[[int], Any] | None) -> Iterator[Path]:
    fh, path = _new_part(tmp_dir)
    try:
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_PART_BYTES:
                raise FetchError("WADO-RS answer larger than the limit", transient=False)
            fh.write(chunk)
            if on_chunk:
                on_chunk(len(chunk))
        fh.close()
    except BaseException:
        fh.close()
        path.unlink(missing_ok=True)
        raise
    yield path


def _parts(chunks: Iterator[bytes], boundary: bytes, tmp_dir: Path,
           on_chunk: Callable[[int], Any] | None) -> Iterator[Path]:
    """Split a multipart/related body into files, holding at most a chunk and a delimiter in memory."""
    delimiter = b"--" + boundary
    body_end = b"\r\n" + delimiter
    buf = bytearray()
    state = "preamble"  # preamble -> headers -> body -> (headers | end)
    fh: Any = None
    path: Path | None = None
    size = 0
    parts = 0
    try:
        for chunk in chunks:
            if on_chunk:
                on_chunk(len(chunk))
            buf += chunk
            while True:
                if state == "preamble":
                    at = buf.find(delimiter)
                    if at < 0 or len(buf) < at + len(delimiter) + 2:
                        break
                    after = at + len(delimiter)
                    if buf[after:after + 2] == b"--":
                        state = "end"
                        break
                    del buf[:after]
                    state = "headers"
                elif state == "headers":
                    at = buf.find(b"\r\n\r\n")
                    if at < 0:
                        if len(buf) > 65536:
                            raise FetchError("WADO-RS part headers too long", transient=True)
                        break
                    del buf[:at + 4]
                    fh, path = _new_part(tmp_dir)
                    size = 0
                    state = "body"
                elif state == "body":
                    at = buf.find(body_end)
                    if at < 0:
                        keep = len(body_end) - 1
                        if len(buf) > keep:
                            out = bytes(buf[:-keep])
                            fh.write(out)
                            size += len(out)
                            del buf[:-keep]
                        if size > MAX_PART_BYTES:
                            raise FetchError("WADO-RS part larger than the limit", transient=False)
                        break
                    fh.write(bytes(buf[:at]))
                    fh.close()
                    fh = None
                    assert path is not None
                    done, path = path, None
                    del buf[:at + 2]  # keep the delimiter: the next state reads it
                    state = "preamble"
                    parts += 1
                    yield done
                else:  # end: the epilogue is ignored
                    buf.clear()
                    break
        # A missing close delimiter after whole parts is forgiven; a cut inside one is not.
        if state in ("headers", "body") or (state == "preamble" and parts == 0):
            raise FetchError("WADO-RS answer ended inside a part (connection dropped?)", busy=True)
    finally:
        if fh is not None:
            fh.close()
        if path is not None:
            path.unlink(missing_ok=True)
