"""Open local paths and s3:// URIs the same way, through pyarrow's filesystems.

S3 endpoints other than AWS (MinIO, moto_server) come from `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, the variables boto3 and the AWS CLI read, so one environment serves every
client. Credentials are left to pyarrow's default AWS chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles); this module never reads or logs them.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

if TYPE_CHECKING:  # pyarrow.fs is imported lazily: importing ptxray must stay cheap
    import pyarrow
    import pyarrow.fs


def is_uri(path_or_uri: str) -> bool:
    """True for `scheme://...` strings; False for local paths (including Windows drive letters)."""
    head, sep, _ = str(path_or_uri).partition("://")
    return bool(sep) and len(head) > 1 and head.replace("+", "").isalnum()


def s3_filesystem_from_env() -> "pyarrow.fs.S3FileSystem":
    """An S3FileSystem configured from the standard AWS environment variables."""
    from pyarrow import fs

    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        endpoint = endpoint.strip().rstrip("/")
        # pyarrow wants host[:port] and the transport separately.
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
            endpoint = endpoint[len("http://") :]
        elif endpoint.startswith("https://"):
            kwargs["scheme"] = "https"
            endpoint = endpoint[len("https://") :]
        kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike (no doubled slashes; `s3://` kept)."""
    return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts)])


def filesystem_and_path(path_or_uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """(filesystem, path inside it) for a local path, file:// URI or s3://bucket/key."""
    from pyarrow import fs

    text = str(path_or_uri)
    if not is_uri(text):
        return fs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    scheme = text.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        path = text.split("://", 1)[1].strip("/")
        if not path:
            raise ValueError(f"{text}: an S3 URI needs a bucket, e.g. s3://bucket/key")
        return s3_filesystem_from_env(), path
    try:
        return fs.FileSystem.from_uri(text)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError here
        raise ValueError(f"{text}: unsupported URI ({e})") from None


def open_input_stream(path_or_uri: str) -> "pyarrow.NativeFile":
    """A binary, readable stream of the object's bytes exactly as stored (no decompression)."""
    filesystem, path = filesystem_and_path(path_or_uri)
    try:
        # compression=None: pyarrow would otherwise decompress by file extension, and callers
        # that sniff magic bytes (gzip) should see one behaviour for local and S3 objects.
        return filesystem.open_input_stream(path, compression=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path_or_uri}: no such file or object") from None


def read_json_object(path_or_uri: str) -> dict:
    """A JSON file or object that must hold a JSON object (dict): ValueError naming the file when it
    is not JSON or not an object; FileNotFoundError when it is missing."""
    with open_input_stream(path_or_uri) as f:
        data = f.read()
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path_or_uri}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path_or_uri}: expected a JSON object, got a JSON {type(doc).__name__}")
    return doc


def write_atomic(path_or_uri: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a whole file so that readers see the old content or the new, never a part.

    `write(f)` fills a binary stream. Locally it streams into a temp file in the same folder, which
    is fsynced and renamed over the target (atomic on POSIX), then the folder is fsynced so the
    rename survives a crash; a failure removes the temp file. On S3 the bytes are uploaded in one
    stream: an object becomes visible only once its upload completes, and S3 has no atomic rename.
    """
    text = str(path_or_uri)
    if is_uri(text) and not text.startswith("file://"):
        filesystem, path = filesystem_and_path(text)
        buffer = io.BytesIO()
        write(buffer)
        with filesystem.open_output_stream(path, compression=None) as out:
            out.write(buffer.getvalue())
        return
    target = Path(text.removeprefix("file://")).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename; "xb" honours the umask like open().
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def write_bytes_atomic(path_or_uri: str | Path, data: bytes) -> None:
    write_atomic(path_or_uri, lambda f: f.write(data))


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk; not every OS allows this.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "filesystem_and_path", "is_uri", "open_input_stream", "read_json_object", "s3_filesystem_from_env", "write_atomic",
    "write_bytes_atomic",
]  # fmt: skip
