"""What a worker tells a trial process about itself, and the local link they speak over.

The contract between worker and ``kiln.core``: the ClusterInfo the worker puts in the trial's
environment, and the frames of the trial → worker link (a Unix socket the worker serves per
allocation; the trial holds no bus credential and reports only through it).
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import msgspec

# The environment variable the worker puts the encoded ClusterInfo in.
CLUSTER_INFO_ENV = "KILN_CLUSTER_INFO"
# Exit code a trial uses to say "these hyperparameters are invalid" (Core API: InvalidHP).
INVALID_HP_EXIT_CODE = 77


class TrialInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The trial a process runs (Determined's ``ClusterInfo.trial``)."""

    trial_id: int
    experiment_id: int
    hparams: dict[str, Any]
    trial_seed: int
    config: dict[str, Any]
    max_length: int | None = None


class ClusterInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a trial process needs to know to report, checkpoint and resume."""

    master_url: str
    cluster_id: str
    allocation_id: str
    worker_id: str
    trial: TrialInfo
    latest_checkpoint: str | None = None
    restarts: int = 0
    slot_ids: list[str] = []
    container_addrs: list[str] = []
    container_rank: int = 0
    # Where node 0 hosts the rendezvous of a trial spanning hosts (0 on one host): what a launcher
    # (kiln.launch.torch_distributed) passes to torchrun.
    master_port: int = 0
    # The worker's Unix socket for this allocation (LinkFrame below): the trial reports through it and
    # hears stop requests on it; it gets no bus credential.
    link_path: str = ""
    # The cluster's checkpoint store. The trial holds no store credential: it asks its worker over the link
    # for a presigned URL per object (PresignRequest below), and only for keys under its own experiment's
    # prefix (checkpoint_prefix) or under the checkpoint it resumes from, and to write its own TensorBoard
    # files (tensorboard_prefix).
    s3_endpoint: str = ""
    s3_bucket: str = "kiln"
    s3_secure: bool = False
    # Checkpoints of other experiments this trial may read (a fine-tune's source): storage id -> its key prefix
    # in the cluster's store (no trailing slash). ``restore_path(uuid)`` looks there instead of its own prefix.
    checkpoint_prefixes: dict[str, str] = {}


# Checkpoints in the cluster's store: <CHECKPOINTS>/<experiment id>/<storage id>/<file>. Grouping them by
# experiment is what lets the worker grant a trial its own experiment's checkpoints and nothing else.
CHECKPOINTS = "checkpoints"


def checkpoint_prefix(experiment_id: int) -> str:
    """The key prefix (no trailing slash) of an experiment's checkpoints in the cluster's store."""
    return f"{CHECKPOINTS}/{int(experiment_id)}"


# TensorBoard files in the cluster's store: <TENSORBOARD>/<experiment id>/<trial id>/<path under the trial's
# TensorBoard directory>. Per trial, so a trial's link may write its own files and no other trial's.
TENSORBOARD = "tensorboard"


def tensorboard_prefix(experiment_id: int, trial_id: int) -> str:
    """The key prefix (no trailing slash) of a trial's TensorBoard files in the cluster's store."""
    return f"{TENSORBOARD}/{int(experiment_id)}/{int(trial_id)}"


# The longest object key anyone may name through Kiln (S3's own limit).
MAX_KEY_BYTES = 1024


def key_refusal(key: str) -> str:
    """Why ``key`` is not a plain object key or relative path ("" when it is): no empty, "." or ".." segment,
    no leading "/", no control characters or backslashes.

    The store behind S3 (SeaweedFS's filer) maps keys onto paths, so a "../" could step out of a prefix; the
    same rule keeps a path from the store inside the directory it is written to.
    """
    if not key:
        return "empty key"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"key longer than {MAX_KEY_BYTES} bytes"
    if any(ord(c) < 32 or c == "\\" for c in key):
        return "control characters or backslashes in the key"
    segments = key.split("/")
    if key.endswith("/"):
        segments = segments[:-1]
    if any(seg in ("", ".", "..") for seg in segments):
        return f"key {key!r} has an empty, '.' or '..' segment"
    return ""


def stored_checkpoint_prefix(storage: str, uuid: str, bucket: str) -> str | None:
    """The key prefix (no trailing slash) of one checkpoint in the cluster's store ``bucket``, from where its
    CheckpointStored says it lives (``s3://<bucket>/checkpoints/<experiment>``); None when it is stored
    anywhere else (another bucket, a shared path), or ``uuid`` is not one plain key segment."""
    root = f"s3://{bucket}/{CHECKPOINTS}/"
    if not storage.startswith(root):
        return None
    experiment = storage[len(root):].strip("/")
    if not experiment.isdigit() or not uuid or "/" in uuid or uuid in (".", ".."):
        return None
    return f"{checkpoint_prefix(int(experiment))}/{uuid}"


# ---------------------------------------------------------------------------------------------
# The trial → worker link: length-prefixed msgpack frames over the allocation's Unix socket.
# ---------------------------------------------------------------------------------------------

# A frame is a 4-byte big-endian body length, then the msgpack body. Bigger frames are refused:
# JetStream takes at most 1 MiB per message anyway.
FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 16 * 1024 * 1024


class Report(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Trial → worker: append this event to the outbox (``event``: one msgpack-encoded wire event)."""

    id: int
    event: msgspec.Raw


class WatchStops(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Trial → worker: push a StopRequested frame when the platform asks this trial to stop."""

    id: int


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Worker → trial: frame ``id`` was handled (a Report is durable in the outbox) or refused."""

    id: int
    ok: bool = True
    error: str = ""


class StopRequested(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Worker → trial: the searcher stopped the trial or the scheduler wants its slots."""

    reason: str


class PresignRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Trial → worker: a short-lived URL to GET or PUT one object of the cluster's store (no credential needed)."""

    id: int
    method: Literal["GET", "PUT", "CREATE_MULTIPART", "UPLOAD_PART", "COMPLETE_MULTIPART", "ABORT_MULTIPART"]
    key: str
    bucket: str = ""  # "": the cluster's bucket; another one of the store only for a data table granted to the trial
    # A big file goes up in parts (S3 multipart): the *_MULTIPART and UPLOAD_PART methods are writes like PUT.
    upload_id: str = ""  # for UPLOAD_PART, COMPLETE_MULTIPART, ABORT_MULTIPART: what CREATE_MULTIPART answered
    part_number: int = 0  # for UPLOAD_PART: 1..10000


class Presigned(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Worker → trial: the presigned URL for PresignRequest ``id`` (a refusal is a Reply with ok=False)."""

    id: int
    url: str


class ListRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Trial → worker: the keys under ``prefix`` (a checkpoint it may read), listed with the worker's key."""

    id: int
    prefix: str
    bucket: str = ""  # as in PresignRequest


class Listed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Worker → trial: the keys of ListRequest ``id``."""

    id: int
    keys: list[str]


LinkFrame = Report | WatchStops | PresignRequest | ListRequest | Reply | StopRequested | Presigned | Listed


class FrameError(ValueError):
    """Bytes on the link that are not a frame (too big, or not decodable)."""


_FRAME_ENCODER = msgspec.msgpack.Encoder()
_FRAME_DECODER: msgspec.msgpack.Decoder[LinkFrame] = msgspec.msgpack.Decoder(LinkFrame)


def encode_frame(frame: LinkFrame) -> bytes:
    """One frame, ready to write: the length header, then the body."""
    body = _FRAME_ENCODER.encode(frame)
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(body)} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    return FRAME_HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length a header announces; FrameError past the limit."""
    (n,) = FRAME_HEADER.unpack(header)
    if n > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {n} bytes announced, the limit is {MAX_FRAME_BYTES}")
    return int(n)


def decode_frame(body: bytes) -> LinkFrame:
    """A frame body back to its Struct; FrameError if it is not one."""
    try:
        return _FRAME_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FrameError(f"not a link frame: {exc}") from None


class FrameBuffer:
    """Cuts a byte stream (as ``recv`` returns it) into frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[LinkFrame]:
        """Add received bytes; return the frames now complete, in order."""
        self._buf += data
        out: list[LinkFrame] = []
        while len(self._buf) >= FRAME_HEADER.size:
            n = frame_length(bytes(self._buf[: FRAME_HEADER.size]))
            end = FRAME_HEADER.size + n
            if len(self._buf) < end:
                break
            out.append(decode_frame(bytes(self._buf[FRAME_HEADER.size:end])))
            del self._buf[:end]
        return out
