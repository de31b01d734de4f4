"""Read back an offline wandb run: its history rows, summary and logged tables.

wandb 0.31 ships no Python reader for a run's ``.wandb`` file. The file is a LevelDB-style log: a
7-byte file header (``":W&B"``, magic ``0xBEE1`` little-endian, version ``0``), then 32 KiB blocks of
chunks, each with a 7-byte header (crc32 ``<I``, length ``<H``, type ``<B``: FULL=1, FIRST=2,
MIDDLE=3, LAST=4); a block tail shorter than a header is zero padding. The crc is zlib's crc32 of
the data seeded with the crc32 of the type byte. Each reassembled record is a protobuf
``wandb_internal_pb2.Record``. Tables are written as JSON under the run's ``files/`` folder and
referenced from the history by path.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

from wandb.proto import wandb_internal_pb2

HEADER = struct.Struct("<4sHB")
HEADER_VALUES = (b":W&B", 0xBEE1, 0)
CHUNK = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Union[str, Path]) -> Iterator[wandb_internal_pb2.Record]:
    """Every ``Record`` of a ``.wandb`` file, in order; checks the header and every chunk's crc."""
    data = Path(path).read_bytes()
    if HEADER.unpack_from(data, 0) != HEADER_VALUES:
        raise ValueError(f"{path} is not a wandb log file (header {data[:HEADER.size]!r}).")
    offset, pending = HEADER.size, b""
    while offset + CHUNK.size <= len(data):
        room = BLOCK_SIZE - offset % BLOCK_SIZE
        if room < CHUNK.size:  # zero padding at the end of a block
            offset += room
            continue
        crc, length, kind = CHUNK.unpack_from(data, offset)
        if (crc, length, kind) == (0, 0, 0):  # trailing zeros of a block not yet filled
            offset += room
            continue
        payload = data[offset + CHUNK.size : offset + CHUNK.size + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc or len(payload) != length:
            raise ValueError(f"{path}: corrupt chunk at byte {offset}.")
        offset += CHUNK.size + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {offset}.")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        yield record
        pending = b""


def _put(target: dict[str, Any], item: Any) -> None:
    """Store an item under its key; media objects arrive flattened as ``nested_key`` = [key, field]."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """An offline run folder (``.../wandb/offline-run-*``) read back: history rows and summary."""

    directory: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    finished: bool = False  # the log holds the run's exit record

    @classmethod
    def read(cls, directory: Union[str, Path]) -> "OfflineRun":
        directory = Path(directory)
        (log,) = directory.glob("run-*.wandb")
        run = cls(directory)
        for record in read_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _put(row, item)
                run.history.append(row)
            elif kind == "summary":
                for item in record.summary.update:
                    _put(run.summary, item)
            elif kind == "exit":
                run.finished = True
            elif kind == "config":
                for item in record.config.update:
                    _put(run.config, item)
        return run

    def keys(self) -> set[str]:
        """Every key logged in any history row."""
        return {key for row in self.history for key in row}

    def chart(self, key: str) -> dict[str, Any]:
        """The custom-chart definition (``wandb.plot.*``) logged under ``key``: its panel config."""
        return self.config["_wandb"]["visualize"][key]["panel_config"]

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        """History rows holding ``key``, in logging order."""
        return [row for row in self.history if key in row]

    def values(self, key: str) -> list[Any]:
        """Every value logged under ``key``, in order."""
        return [row[key] for row in self.rows_with(key)]

    def file(self, value: dict[str, Any]) -> Path:
        """The file a logged media value (table, image, histogram file) refers to."""
        return self.directory / "files" / value["path"]

    def table(self, key: str, index: int = -1) -> dict[str, Any]:
        """The ``index``-th table logged under ``key`` (a ``wandb.Table`` or a custom chart's
        ``<key>_table``) as ``{"columns": [...], "data": [[...], ...]}``."""
        values = self.values(key) or self.values(f"{key}_table")
        if not values:
            raise KeyError(f"no table logged under {key!r}; keys: {sorted(self.keys())}")
        return json.loads(self.file(values[index]).read_text())

    def table_rows(self, key: str, index: int = -1) -> list[dict[str, Any]]:
        """Rows of :meth:`table` as dicts keyed by column."""
        table = self.table(key, index)
        return [dict(zip(table["columns"], row)) for row in table["data"]]


def latest_run(save_dir: Union[str, Path], timeout: float = 60.0) -> OfflineRun:
    """The single offline run under ``save_dir/wandb`` (as written by ``WandbLogger(save_dir=...)``),
    read once its folder exists and its log holds the exit record (wandb's service may still be writing after
    ``finish``)."""
    deadline = time.monotonic() + timeout
    runs = sorted(Path(save_dir).glob("wandb/offline-run-*"))
    while not runs and time.monotonic() < deadline:  # under load the service may create the folder after `finish`
        time.sleep(0.2)
        runs = sorted(Path(save_dir).glob("wandb/offline-run-*"))
    if len(runs) != 1:
        raise AssertionError(f"expected one offline run under {save_dir}, found {runs}")
    while True:
        try:
            run = OfflineRun.read(runs[0])
        except ValueError:  # a chunk still being written
            run = None
        if run is not None and run.finished:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"{runs[0]} has no exit record after {timeout}s: was the run finished?")
        time.sleep(0.2)
