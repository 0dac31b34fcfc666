"""The tuning database that ``bnfold compile --db DIR`` applies: only the records ``bnfold tune``
chose (``DIR/bnfold_choice.json``), each where it measured faster than bnfold's own schedule.

It lives in ``targets/schedule/`` beside the schedule rules it competes with, so that the CPU
pipeline (:func:`bnfold.targets.schedule.cpu_pipeline`) reads a database without importing the
tuner (:mod:`bnfold.lower.tune` writes the choice, this module reads it). tvm is imported
lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError

logger = logging.getLogger(__name__)

# The decisions of `bnfold tune`, in the database folder.
CHOICE_FILE = "bnfold_choice.json"
CHOICE_FORMAT = "bnfold.tune_choice/1"


def record_key(record: Any) -> str:
    """A stable key of a tuning record: sha256 of its trace (instructions and decisions)."""
    trace = record.as_json()[0]
    return hashlib.sha256(json.dumps(trace, sort_keys=True).encode()).hexdigest()[:20]


def read_choice(database: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The choice file of a database folder (None if there is none).

    Raises:
        BnfoldError: The file exists but is not a choice file.
    """
    path = Path(database) / CHOICE_FILE
    if not path.is_file():
        return None
    try:
        choice = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BnfoldError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(choice, dict) or choice.get("format") != CHOICE_FORMAT:
        raise BnfoldError(f"{path}: not a {CHOICE_FORMAT} file")
    return choice


def chosen_database(database: str | os.PathLike[str]) -> Any:
    """The MetaSchedule database ``compile --db`` applies: an in-memory one holding only the
    records ``bnfold tune`` chose (``bnfold_choice.json``); every record of the folder when it
    has no choice file (with a warning)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    choice = read_choice(database)
    source = ms.database.JSONDatabase(work_dir=str(database))
    if choice is None:
        logger.warning("%s has no %s: every record in it replaces bnfold's schedule, even where "
                       "it is slower (`bnfold tune MODEL --trials 0 --db %s` chooses)", database,
                       CHOICE_FILE, database)  # fmt: skip
        return source
    wanted = {
        (shash, entry.get("record"))
        for shash, entry in choice["workloads"].items()
        if entry.get("chosen") == "tuned" and entry.get("record")
    }
    chosen = ms.database.MemoryDatabase()
    shashes = {s for s, _ in wanted}
    found: set[tuple[str, str]] = set()
    for rec in source.get_all_tuning_records():
        mod = rec.workload.mod
        shash = str(tvm_ffi.structural_hash(mod))
        if shash not in shashes:
            continue
        key = (shash, record_key(rec))
        if key not in wanted or key in found:
            continue
        found.add(key)
        workload = chosen.commit_workload(mod)
        chosen.commit_tuning_record(
            ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target, rec.args_info)
        )
    if len(found) < len(wanted):
        logger.warning("%s: %d chosen record(s) are missing from the database; those functions "
                       "keep bnfold's rules", database, len(wanted) - len(found))  # fmt: skip
    logger.info("%s: applying %d tuned record(s) chosen by bnfold tune; the other functions keep "
                "bnfold's rules", database, len(found))  # fmt: skip
    return chosen
