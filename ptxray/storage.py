"""Open local paths and s3:// URIs the same way, through pyarrow's filesystems.

S3 endpoints other than AWS (MinIO, moto_server) come from `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, the variables boto3 and the AWS CLI read, so one environment serves every
client. Credentials are left to pyarrow's default AWS chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles); this module never reads or logs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

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


def write_bytes_atomic(path_or_uri: str, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a part.

    Locally: a temp file in the same folder, fsync, then os.replace. On S3 one PUT is atomic by
    nature (an object becomes visible only when its upload completes).
    """
    if not is_uri(path_or_uri) or path_or_uri.startswith("file://"):
        import tempfile

        target = Path(path_or_uri.removeprefix("file://")).expanduser().absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    filesystem, path = filesystem_and_path(path_or_uri)
    with filesystem.open_output_stream(path) as f:
        f.write(data)


__all__ = ["filesystem_and_path", "is_uri", "open_input_stream", "s3_filesystem_from_env", "write_bytes_atomic"]
