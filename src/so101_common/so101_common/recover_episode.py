"""``so101-recover-episode DIR...``: rebuild a readable episode from the .mcap a killed recorder left behind.

A recorder killed with SIGKILL (or stopped by a full disk or a power cut) leaves its episode folder with an
unfinalised .mcap: no summary, no footer, and no metadata.yaml beside it, so no bag reader opens it. The data
section of an mcap is self-describing (schemas, channels and messages in file order), so every record up to the
cut is read back one by one, written into a proper rosbag2 episode (metadata.yaml + episode.json marked
"recovered") and swapped in. The original file stays next to it as ``<name>.mcap.unfinalised``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from so101_common.episode_bag import (
    EPISODE_FILE,
    INDEX_FILE,
    EpisodeMetadata,
    EpisodeMetadataError,
    EpisodeWriter,
    read_episode_metadata,
    update_index,
)

BAG_METADATA_FILE = "metadata.yaml"
UNFINALISED_SUFFIX = ".unfinalised"
RECOVERY_TOOL = "so101-recover-episode"
_SPACE_MARGIN = 16 * 2**20


@dataclass(frozen=True)
class Recovery:
    ok: bool
    message: str


def _source_mcap(path: Path) -> Path:
    """The unfinalised mcap of ``path``; a copy kept by an interrupted earlier recovery wins over a new file."""
    kept = sorted(path.glob(f"*.mcap{UNFINALISED_SUFFIX}"))
    found = kept or sorted(path.glob("*.mcap"))
    if not found:
        raise ValueError(f"{path}: no .mcap file in it: nothing to recover")
    if len(found) > 1:
        raise ValueError(f"{path}: {len(found)} .mcap files ({[p.name for p in found]}); recover needs exactly one")
    return found[0]


def _readable_records(fh: BinaryIO, size: int, stop: list[str]) -> Iterator[object]:
    """mcap records of ``fh`` in file order until the first that cannot be read; why it stopped goes to ``stop``."""
    from mcap.stream_reader import StreamReader

    records = iter(StreamReader(fh, record_size_limit=size).records)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - whatever the cut-off tail raises, it ends the readable part
            detail = str(exc) or "cut off"
            stop.append(f"reading stopped at byte {fh.tell()} of {size} ({type(exc).__name__}: {detail})")
            return
        yield record


def _copy_readable(src: Path, writer: EpisodeWriter) -> tuple[dict[str, int], int, str]:
    """Copy every readable message of ``src`` into ``writer``; (per-topic counts, last time, why reading stopped)."""
    from mcap.records import Channel, DataEnd, Footer, Message, Schema
    from rosbags.typesys import TypesysError

    schemas: dict[int, str] = {}
    channels: dict[int, str] = {}
    counts: dict[str, int] = {}
    unknown: dict[str, str] = {}
    last_ns = 0
    stop: list[str] = []
    size = src.stat().st_size
    with open(src, "rb") as fh:
        for record in _readable_records(fh, size, stop):
            if isinstance(record, Schema):
                schemas[record.id] = record.name
            elif isinstance(record, Channel):
                msgtype = schemas.get(record.schema_id, "")
                try:
                    writer.add_topic(record.topic, msgtype)
                except TypesysError:
                    unknown[record.topic] = msgtype or "no schema"
                    continue
                channels[record.id] = record.topic
                counts.setdefault(record.topic, 0)
            elif isinstance(record, Message) and record.channel_id in channels:
                topic = channels[record.channel_id]
                writer.write(topic, record.log_time, record.data)
                counts[topic] += 1
                last_ns = max(last_ns, record.log_time)
            elif isinstance(record, (DataEnd, Footer)):  # the summary after it repeats
                break
    why = stop[0] if stop else "the file ends cleanly"
    if unknown:
        why += f"; topics of types this tool does not know were left out: {unknown}"
    return counts, last_ns, why


def recover_episode(path: str | Path) -> Recovery:
    """Rebuild episode folder ``path`` from its unfinalised mcap; a Recovery that says what happened."""
    path = Path(path)
    if not path.is_dir():
        return Recovery(False, f"{path}: not a folder")
    if (path / BAG_METADATA_FILE).is_file():
        return Recovery(True, f"{path}: already a readable bag ({BAG_METADATA_FILE} present); nothing to do")
    try:
        src = _source_mcap(path)
    except ValueError as exc:
        return Recovery(False, str(exc))
    meta: EpisodeMetadata | None = None
    note = ""
    if (path / EPISODE_FILE).is_file():
        try:
            meta = read_episode_metadata(path)
        except EpisodeMetadataError as exc:
            note = f"; its {EPISODE_FILE} was unusable ({exc}) and is left as it was"
    free = shutil.disk_usage(path.parent).free
    if free < src.stat().st_size + _SPACE_MARGIN:
        return Recovery(False, f"{path}: recovery needs about {src.stat().st_size / 2**20:.0f} MiB free in "
                               f"{path.parent}, only {free / 2**20:.0f} MiB are: free some space and run again")
    staging = path.parent / f".{path.name}.recovering"
    shutil.rmtree(staging, ignore_errors=True)
    new = staging / path.name  # rosbags names the mcap after its folder: the same file name as the original
    if meta is not None:
        meta.message_counts = {}  # counted again: only what the file really holds
    try:
        writer = EpisodeWriter(new, EpisodeMetadata(instruction="") if meta is None else meta)
        counts, last_ns, stop = _copy_readable(src, writer)
        total = sum(counts.values())
        recovery = f"rebuilt by {RECOVERY_TOOL} from an unfinalised {path.name}.mcap: {total} messages; {stop}"
        if meta is None:
            writer.close(success=None, stop_time_ns=last_ns or None)
        else:
            meta.recovery = recovery
            writer.close(success=meta.success, failure=meta.failure,
                         status="recovered" if meta.status in ("recording", "recovered") else meta.status,
                         stop_time_ns=last_ns or None)
        if src.suffix != UNFINALISED_SUFFIX:
            kept = src.with_name(src.name + UNFINALISED_SUFFIX)
            os.replace(src, kept)
        bag_files = [p for p in new.iterdir() if p.name not in (BAG_METADATA_FILE, EPISODE_FILE)]
        for file in bag_files:
            os.replace(file, path / file.name)
        if meta is not None:
            os.replace(new / EPISODE_FILE, path / EPISODE_FILE)
        os.replace(new / BAG_METADATA_FILE, path / BAG_METADATA_FILE)  # last: from here on it is a bag
    except OSError as exc:
        return Recovery(False, f"{path}: recovery failed ({exc}); the original mcap is kept as it was")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if (path.parent / INDEX_FILE).is_file():  # a dataset folder: its index lists the episode as recovered now
        try:
            update_index(path.parent)
        except OSError as exc:
            note += f"; {path.parent / INDEX_FILE} could not be updated ({exc})"
    topics = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
    plain = (" (no episode.json: train with --instruction)" if meta is None else "")
    return Recovery(True, f"{path}: recovered {total} messages [{topics}]; {stop}; original kept as "
                          f"{src.name if src.suffix == UNFINALISED_SUFFIX else src.name + UNFINALISED_SUFFIX}"
                          f"{plain}{note}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=RECOVERY_TOOL, description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="episode folders without metadata.yaml")
    args = parser.parse_args(argv)
    code = 0
    for folder in args.dirs:
        result = recover_episode(folder)
        print(result.message, file=sys.stdout if result.ok else sys.stderr, flush=True)
        if not result.ok:
            code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
