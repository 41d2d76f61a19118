"""Open local paths and s3:// URIs the same way, through pyarrow's filesystems.

S3 endpoints other than AWS (MinIO, moto_server) come from `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, the variables boto3 and the AWS CLI read, so one environment serves every
client. Credentials are left to pyarrow's default AWS chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles); this module never reads or logs them.

S3 calls give up: a connection attempt after `S3_CONNECT_TIMEOUT_S`, a transfer that stalls for
`S3_REQUEST_TIMEOUT_S`, a request after `S3_MAX_ATTEMPTS` tries (the AWS SDK's standard retry
strategy, with backoff). A failure becomes a `StorageError` (`s3_errors`, `open_input_stream`):
one line that names the object and the cause (endpoint unreachable, no credentials, access denied,
no such bucket), which the CLI prints without a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

if TYPE_CHECKING:  # pyarrow.fs is imported lazily: importing ptxray must stay cheap
    import pyarrow
    import pyarrow.fs


def is_uri(path_or_uri: str) -> bool:
    """True for `scheme://...` strings; False for local paths (including Windows drive letters)."""
    head, sep, _ = str(path_or_uri).partition("://")
    return bool(sep) and len(head) > 1 and head.replace("+", "").isalnum()


S3_CONNECT_TIMEOUT_S = 10.0
# For the AWS SDK's curl client this is a stall limit (the transfer stays below 1 byte/s this long),
# not a cap on a whole transfer: large objects are fine.
S3_REQUEST_TIMEOUT_S = 60.0
# Tries per request, pyarrow's default too. pyarrow does not pickle the retry strategy, so a
# filesystem shipped to Ray workers gets its default there: the same number.
S3_MAX_ATTEMPTS = 3


class StorageError(OSError):
    """An object store that cannot be reached, refuses us or lacks the bucket; the message is one
    line naming the object (or URI) and the cause."""


def s3_filesystem_from_env() -> "pyarrow.fs.S3FileSystem":
    """An S3FileSystem configured from the standard AWS environment variables, with bounded
    timeouts and retries (module doc)."""
    from pyarrow import fs

    kwargs: dict = {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
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


# pyarrow's S3 errors are OSErrors whose text is all there is: "When getting information for key
# 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, ...".
_AWS_ERROR = re.compile(r"AWS Error (?P<code>[A-Z_]+)(?: \(HTTP status (?P<status>\d+)\))? during (?P<op>\w+) operation:?(?P<detail>[^\n]*)")
_S3_OBJECT = re.compile(r"(?:key '(?P<key>[^']*)' in )?bucket '(?P<bucket>[^']+)'")
_AUTH_CODES = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "INVALID_CLIENT_TOKEN_ID")


def _aws_credentials_found() -> bool | None:
    """Whether the AWS credential chain (environment, shared files, profiles, instance roles) finds
    any credentials, as botocore resolves it; None when that cannot be told. Only asked after a
    request failed: pyarrow (the AWS C++ SDK) sends unsigned requests when it finds none."""
    try:
        import botocore.session

        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # botocore missing, or a broken profile: no diagnosis rather than a new error
        return None


def storage_error(uri: str, error: BaseException) -> StorageError | None:
    """A one-line StorageError for an S3 failure found in `error`'s text (it may be wrapped, e.g.
    in a Ray task error); None when the text holds no AWS error. Names the object from the error
    when it says which, else `uri`."""
    text = str(error)
    found = _AWS_ERROR.search(text)
    if found is None:
        return None
    code, status, op = found["code"], found["status"], found["op"]
    detail = found["detail"].strip().rstrip(".")
    where = uri
    obj = None
    for obj in _S3_OBJECT.finditer(text[: found.start()]):
        pass  # the last object named before the error is the one it is about
    if obj is not None:
        where = f"s3://{obj['bucket']}/{obj['key']}" if obj["key"] else f"s3://{obj['bucket']}"
    said = f"AWS Error {code}" + (f" (HTTP {status})" if status else "") + f" during {op}"
    if code == "NETWORK_CONNECTION":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        cause = f"cannot reach the S3 endpoint {endpoint} after {S3_MAX_ATTEMPTS} tries ({detail.split('; Details')[0] or said})"
    elif code == "NO_SUCH_BUCKET":
        cause = "the bucket does not exist"
    elif _aws_credentials_found() is False:
        cause = (
            "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE); "
            f"the endpoint refused the unsigned request: {said}"
        )
    elif code in _AUTH_CODES or status == "403":
        cause = f"access denied: check the AWS credentials and their permissions ({said})"
    else:
        cause = said + (f": {detail}" if detail and detail != "No response body" else "")
    return StorageError(f"{where}: {cause}")


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """Turn an S3 failure raised in the block into a one-line StorageError (`storage_error`);
    anything else passes unchanged."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except Exception as e:
        translated = storage_error(uri, e)
        if translated is None:
            raise
        raise translated from None


def check_bucket(uri: str) -> None:
    """For an s3:// URI: fail now, with a StorageError naming it, when the endpoint cannot be reached
    or the bucket does not exist (before hours of work that end in a write). Local paths pass."""
    import pyarrow.fs as pafs

    if not is_uri(uri) or uri.split("://", 1)[0].lower() not in ("s3", "s3a"):
        return
    filesystem, path = filesystem_and_path(uri)
    bucket = path.split("/", 1)[0]
    with s3_errors(uri):
        info = filesystem.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist (create it first)")


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
        with s3_errors(path_or_uri):
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


def exists(path_or_uri: str) -> bool:
    """Whether a file, folder or S3 prefix is there."""
    import pyarrow.fs as pafs

    filesystem, path = filesystem_and_path(path_or_uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def _is_absolute(path_or_uri: str) -> bool:
    return is_uri(path_or_uri) or Path(path_or_uri).expanduser().is_absolute()


def _normal(path_or_uri: str) -> str:
    text = str(path_or_uri).rstrip("/")
    return text if is_uri(text) else str(Path(text).expanduser().absolute())


def relative_to_run(path_or_uri: str, run_dir: str) -> str:
    """`path_or_uri` relative to the run folder when it lies inside it (what summary.json and the
    out-of-fold store record), else unchanged."""
    path, root = _normal(path_or_uri), _normal(run_dir)
    if path == root:
        return "."
    return path[len(root) + 1 :] if path.startswith(root + "/") else str(path_or_uri)


def resolve_in_run(path_or_uri: str, run_dir: str) -> str:
    """The inverse of `relative_to_run`: a relative path is inside the run folder, wherever it is now."""
    if _is_absolute(str(path_or_uri)):
        return str(path_or_uri)
    return str(run_dir).rstrip("/") if str(path_or_uri) in ("", ".") else join(run_dir, str(path_or_uri))


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
    "S3_CONNECT_TIMEOUT_S", "S3_MAX_ATTEMPTS", "S3_REQUEST_TIMEOUT_S", "StorageError", "check_bucket", "exists",
    "filesystem_and_path", "is_uri", "open_input_stream", "read_json_object", "relative_to_run", "resolve_in_run", "s3_errors",
    "s3_filesystem_from_env", "storage_error", "write_atomic", "write_bytes_atomic",
]  # fmt: skip
