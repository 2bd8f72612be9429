"""List files (``.txt``/``.lst``/``.list``/``.tsv``/``.csv``): one image per line, optional labels."""

from __future__ import annotations

import csv
import io
import os

from .. import storage
from .items import ItemList, Progress, SourceError, _Builder

_HEADER_PATH_NAMES = frozenset({"path", "filename", "file"})


def _read_list(list_path: str, progress: Progress | None = None) -> ItemList:
    remote = storage.is_remote(list_path)
    base = storage.parent(list_path) if remote else os.path.dirname(os.path.abspath(list_path))
    ext = os.path.splitext(storage.basename(list_path))[1].lower()
    out = _Builder(base, "uri" if remote else "abspath", progress)
    header: tuple[int, int | None] | None = None  # (path column, label column) named by a header row
    first = True
    if remote:
        try:
            text = storage.read_bytes(list_path).decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read list file {storage.display(list_path)}: {storage.describe(exc)}") from None
        lines = io.StringIO(text, newline="")
    else:
        lines = open(list_path, encoding="utf-8-sig", newline="")  # -sig: a spreadsheet's byte-order mark
    with lines as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{storage.display(list_path) if remote else list_path}:{lineno}"
            if ext == ".csv" or (ext == ".tsv" or "\t" in line):
                fields = next(csv.reader([line])) if ext == ".csv" else line.split("\t")
                fields = [x.strip() for x in fields]
                if first and ext in (".csv", ".tsv") and fields[0].lower() in _HEADER_PATH_NAMES:
                    header = _header_columns(fields)
                    first = False
                    continue
                rel, label = _pick_fields(fields, header, where, ext)
            else:
                rel, label = _split_spaces(line, base, where)
            first = False
            if not rel:
                raise SourceError(f"{where}: empty path")
            try:
                out.add(rel, label)
            except KeyError:
                raise SourceError(f"{where}: duplicate path {rel!r} (ids must be unique)") from None
    if progress is not None:
        progress(len(out))
    return out.build()


def _header_columns(fields: list[str]) -> tuple[int, int | None]:
    names = [x.lower() for x in fields]
    label = names.index("label") if "label" in names else (1 if len(names) > 1 else None)
    return 0, label


def _pick_fields(
    fields: list[str], header: tuple[int, int | None] | None, where: str, ext: str
) -> tuple[str, str | None]:
    if header is not None:
        path_col, label_col = header
        rel = fields[path_col] if path_col < len(fields) else ""
        label = fields[label_col] if label_col is not None and label_col < len(fields) else ""
        return rel, label or None
    if len(fields) > 2:
        sep = "comma" if ext == ".csv" else "tab"
        raise SourceError(
            f"{where}: {len(fields)} {sep}-separated fields, expected path{',' if sep == 'comma' else '<TAB>'}label; "
            f"quote fields that hold a {sep}, or start the file with a header row naming the columns (path, label)"
        )
    return fields[0], (fields[1] or None) if len(fields) > 1 else None


def _split_spaces(line: str, base: str, where: str) -> tuple[str, str | None]:
    """A ``.txt``/``.lst`` line without a tab: ``path`` or ``path label`` when that is the only reading."""
    line = line.strip()
    parts = line.rsplit(None, 1)
    if len(parts) == 1:
        return line, None  # one token
    # A path may itself contain spaces: the whole line is the path when that file exists.
    if storage.is_remote(base):  # a remote list: its relative paths are keys under its folder
        if storage.exists(storage.join(base, line)):
            return line, None
    elif os.path.exists(os.path.join(base, line)):
        return line, None
    path, label = parts
    if not any(c.isspace() for c in path) or storage.is_file(storage.join(base, path)):
        return path, label
    raise SourceError(
        f"{where}: ambiguous line {line!r}: neither the whole line nor {path!r} is an existing file, so "
        "it cannot be told which spaces belong to the path and which to the label; separate path and label "
        "with a tab, or use a .tsv or .csv list (path,label)"
    )
