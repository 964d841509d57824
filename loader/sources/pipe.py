"""`pipe:COMMAND` shards, as WebDataset names them: the shard is what COMMAND writes to stdout
(`pipe:aws s3 cp s3://bucket/train-0001.tar -`). Run with webdataset's `gopen`.

COMMAND runs in a shell on the service, with the service's rights, so pipe: shards are refused
unless the config sets `remote: {allow_pipe: true}` (or LOADER_REMOTE_ALLOW_PIPE=1): anyone who
may add shards (`loader add-shards`) could otherwise run commands there. The command is trusted to
end and to retry by itself (`curl --retry 3 --max-time 60`); it runs once per fetch, and its output
is kept in the read cache like a remote shard's.
"""

from __future__ import annotations

import re
import shutil

from loader.errors import ShardError
from loader.sources import remote_settings
from loader.sources.remote import scrub

PREFIX = "pipe:"
REFUSED = (
    "pipe: shards run a shell command on the service and are off; set remote: {allow_pipe: true} "
    "in the config (or LOADER_REMOTE_ALLOW_PIPE=1) to allow them"
)


def is_pipe(uri: str) -> bool:
    return uri.startswith(PREFIX)


def shown(uri: str) -> str:
    """The URI as errors and logs name it: credentials from the environment blanked out."""
    return scrub(uri)


def format_suffix(uri: str) -> str:
    """`.parquet` when the command's last word ends so, else `.tar` (WebDataset's convention)."""
    words = uri[len(PREFIX):].split()
    last = words[-1].lower() if words else ""
    return ".parquet" if last.endswith((".parquet", ".pq")) else ".tar"


def check_allowed(uri: str) -> None:
    """A ShardError unless this process's settings allow pipe: shards and COMMAND is not empty."""
    if not remote_settings.current().allow_pipe:
        raise ShardError(shown(uri), REFUSED)
    if not uri[len(PREFIX):].strip():
        raise ShardError(shown(uri), "empty pipe: command")


def fetch(uri: str, target: str) -> None:
    """Writes COMMAND's output to `target`; a ShardError when COMMAND fails."""
    check_allowed(uri)
    from webdataset.gopen import gopen

    try:
        stream = gopen(uri, "rb")
        with open(target, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        stream.close()  # waits for the command; a non-zero exit status raises here
    except Exception as exc:  # noqa: BLE001 - whatever the command did, this shard cannot be read
        # gopen's message repeats the command and its Popen arguments; the status is what matters.
        status = re.search(r": exit (-?\d+)", str(exc))
        detail = f"exit {status.group(1)}" if status else scrub(str(exc), uri)
        raise ShardError(shown(uri), f"pipe: command failed: {detail}") from None
