"""Sources: folder walks (symlinks, order, compact item lists, progress), list-file formats, read errors."""

from __future__ import annotations

import io
import os
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastfeat import sources
from fastfeat.decode import read_image
from fastfeat.faults import ReadFault
from fastfeat.sources import Item, ItemList, ItemReader, Skipped, SourceError, format_skipped, list_items


def _touch(root, *names: str, data: bytes = b"x") -> None:
    for name in names:
        path = os.path.join(str(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _ids(items) -> list[str]:
    return [it.id for it in items]


# ------------------------------------------------------------------------------------------------
# Folders: semantics kept


def test_folder_ids_labels_order_and_filters(tmp_path):
    names = [
        "x.jpg", "a.jpg", "a-b.jpg", "a0.jpg", "a/1.jpg", "a/2.PNG", "a/deep/er/3.webp", "b c/4 5.jpeg",
        "é/6.jpg", "z/7.gif", "Z/8.tif",
        ".hidden.jpg", ".hid/9.jpg", "a/.h.jpg", "a/notes.txt", "a/jpg", "noext",
    ]  # fmt: skip
    _touch(tmp_path, *names)
    items = list_items(str(tmp_path))
    expected = sorted(
        (n for n in names if not any(p.startswith(".") for p in n.split("/")) and n.endswith(
            (".jpg", ".PNG", ".webp", ".jpeg", ".gif", ".tif"))),
        key=lambda s: s.encode("utf-8"),
    )  # fmt: skip
    assert _ids(items) == expected
    assert _ids(items)[:5] == ["Z/8.tif", "a-b.jpg", "a.jpg", "a/1.jpg", "a/2.PNG"]  # byte order: '-' < '.' < '/'
    by_id = {it.id: it for it in items}
    assert by_id["x.jpg"].label is None and by_id["a/deep/er/3.webp"].label == "a" and by_id["é/6.jpg"].label == "é"
    assert by_id["b c/4 5.jpeg"].path == os.path.join(str(tmp_path), "b c", "4 5.jpeg")
    assert all(os.path.isabs(it.path) and os.path.isfile(it.path) for it in items)
    assert items.skipped == [] and format_skipped(items.skipped) is None


def test_relative_source_gives_absolute_paths(tmp_path, monkeypatch):
    _touch(tmp_path, "src/c/1.jpg")
    monkeypatch.chdir(tmp_path)
    (it,) = list_items("src")
    assert it == Item("c/1.jpg", os.path.join(str(tmp_path), "src", "c", "1.jpg"), "c")


def test_undecodable_file_name_round_trips(tmp_path):
    name = b"\xff\xfe.jpg"
    try:
        with open(os.path.join(os.fsencode(str(tmp_path)), name), "wb") as f:
            f.write(b"data")
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    (it,) = list_items(str(tmp_path))
    assert it.id == os.fsdecode(name) and ItemReader().read(it) == b"data"


# ------------------------------------------------------------------------------------------------
# Folders: symbolic links


def test_link_back_to_parent_is_skipped_and_reported(tmp_path):
    _touch(tmp_path, "a/1.jpg", "a/2.jpg", "b/3.jpg", "4.jpg", "5.jpg")
    os.symlink("..", tmp_path / "a" / "up")
    items = list_items(str(tmp_path))
    assert _ids(items) == ["4.jpg", "5.jpg", "a/1.jpg", "a/2.jpg", "b/3.jpg"]  # 5 images, 5 rows
    assert items.skipped == [Skipped("a/up", "loop", "..", None)]
    assert format_skipped(items.skipped) == "skipped 1 directory link that loops back (e.g. a/up -> ..)"


def test_several_links_back_do_not_hang(tmp_path):
    _touch(tmp_path, "a/1.jpg", "a/b/2.jpg", "3.jpg")
    os.symlink("..", tmp_path / "a" / "up")  # to the source
    os.symlink("../..", tmp_path / "a" / "b" / "top")  # to the source, two levels up
    os.symlink("..", tmp_path / "a" / "b" / "parent")  # to its parent
    os.symlink(".", tmp_path / "a" / "self")  # to itself
    os.symlink(str(tmp_path), tmp_path / "root")  # absolute, to the source
    t0 = time.perf_counter()
    items = list_items(str(tmp_path))
    assert time.perf_counter() - t0 < 5
    assert _ids(items) == ["3.jpg", "a/1.jpg", "a/b/2.jpg"]
    assert sorted((s.path, s.reason) for s in items.skipped) == [
        ("a/b/parent", "loop"), ("a/b/top", "loop"), ("a/self", "loop"), ("a/up", "loop"), ("root", "loop"),
    ]  # fmt: skip
    assert format_skipped(items.skipped).startswith("skipped 5 directory links that loop back (e.g. ")


def test_links_that_do_not_loop_are_followed(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    _touch(elsewhere, "e1.jpg", "sub/e2.jpg")
    _touch(src, "a/1.jpg", "b/2.jpg")
    os.symlink(str(elsewhere), src / "ext")  # a folder outside: followed, first-level label is the link's name
    os.symlink("../a", src / "b" / "sibling")  # a sibling folder: not a loop, followed as before
    os.symlink("1.jpg", src / "a" / "one.jpg")  # a file link
    os.symlink("gone.jpg", src / "a" / "broken.jpg")  # broken file link
    os.symlink("nowhere", src / "b" / "gone_dir")  # broken link, perhaps to a folder
    os.symlink("selfloop.jpg", src / "b" / "selfloop.jpg")  # a link to itself
    items = list_items(str(src))
    assert _ids(items) == ["a/1.jpg", "a/one.jpg", "b/2.jpg", "b/sibling/1.jpg", "b/sibling/one.jpg",
                           "ext/e1.jpg", "ext/sub/e2.jpg"]  # fmt: skip
    assert [it.label for it in items] == ["a", "a", "b", "b", "b", "ext", "ext"]
    assert items[1].path == os.path.join(str(src), "a", "one.jpg")
    skipped = {s.path: s for s in items.skipped}
    assert set(skipped) == {"a/broken.jpg", "b/gone_dir", "b/selfloop.jpg", "b/sibling/broken.jpg"}
    assert all(s.reason == "broken link" for s in skipped.values())
    assert skipped["a/broken.jpg"].target == "gone.jpg" and skipped["b/selfloop.jpg"].message
    assert format_skipped(items.skipped) == "skipped 4 broken links (e.g. a/broken.jpg -> gone.jpg)"


def test_unreadable_folder_is_skipped_and_reported(tmp_path, monkeypatch):
    _touch(tmp_path, "a/1.jpg", "locked/2.jpg", "3.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if os.fsdecode(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(sources.folder.os, "scandir", scandir)
    items = list_items(str(tmp_path))
    assert _ids(items) == ["3.jpg", "a/1.jpg"]
    assert items.skipped == [Skipped("locked", "unreadable", None, "Permission denied")]
    assert format_skipped(items.skipped) == "skipped 1 unreadable folder (e.g. locked: Permission denied)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_for_real(tmp_path):
    _touch(tmp_path, "a/1.jpg", "locked/2.jpg")
    os.chmod(tmp_path / "locked", 0)
    try:
        items = list_items(str(tmp_path))
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert _ids(items) == ["a/1.jpg"] and [s.reason for s in items.skipped] == ["unreadable"]


def test_empty_folder_error_says_what_was_skipped(tmp_path):
    _touch(tmp_path, "notes.txt")
    os.symlink("gone.jpg", tmp_path / "a.jpg")
    with pytest.raises(SourceError, match=r"source has no images: .*1 broken link \(e\.g\. a\.jpg -> gone\.jpg\)"):
        list_items(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Progress and the compact item list


def test_progress_while_listing_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.folder, "PROGRESS_EVERY", 10)
    _touch(tmp_path, *[f"c{k}/{i:03d}.jpg" for k in range(3) for i in range(20)], "c0/readme.txt")
    calls: list[int] = []
    items = list_items(str(tmp_path), progress=calls.append)
    assert len(items) == 60 and calls[-1] == 60
    assert len(calls) >= 6 and calls == sorted(calls)  # about every 10 entries, running count of images


def test_progress_while_reading_a_list(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.items, "PROGRESS_EVERY", 10)
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"img{i}.jpg\n" for i in range(25)))
    calls: list[int] = []
    list_items(str(lst), progress=calls.append)
    assert calls == [10, 20, 25]


def test_item_list_is_a_compact_sequence(tmp_path):
    n = 3000
    _touch(tmp_path, *[f"class{i % 30:02d}/img_{i:07d}.jpg" for i in range(n)], data=b"")
    items = list_items(str(tmp_path))
    assert isinstance(items, ItemList) and len(items) == n
    first, last = items[0], items[-1]
    assert first == Item(
        "class00/img_0000000.jpg", os.path.join(str(tmp_path), "class00", "img_0000000.jpg"), "class00"
    )
    assert last.id == "class29/img_0002999.jpg" and items[n - 1] == last
    with pytest.raises(IndexError):
        items[n]
    chunk = items[100:164]  # what the runner takes per batch
    assert isinstance(chunk, list) and len(chunk) == 64 and chunk[0] == items[100] and chunk[-1] == items[163]
    assert items[n - 2 :] == [items[n - 2], items[n - 1]] and items[5:5] == []
    listed = list(items)
    assert listed == items and items == listed and _ids(listed) == list(items.ids())
    assert [it.label for it in listed] == list(items.labels())
    assert f"{first.id}\t{first.label}" == "class00/img_0000000.jpg\tclass00"
    with pytest.raises(AttributeError):  # frozen, slots
        first.id = "x"
    assert not hasattr(first, "__dict__")
    # Columns: the ids' bytes plus a few bytes per item (a list of Items took ~430 bytes each).
    id_bytes = sum(len(i) for i in items.ids())
    assert items.nbytes() <= id_bytes + 6 * n


def test_item_list_of_a_list_file_resolves_paths_as_before(tmp_path):
    (tmp_path / "sub").mkdir()
    lst = tmp_path / "sub" / "l.txt"
    lst.write_text("../a.jpg\tx\nb/../c.jpg\n/abs/d.jpg y\n")
    items = list_items(str(lst))
    assert list(items) == [
        Item("../a.jpg", str(tmp_path / "a.jpg"), "x"),
        Item("b/../c.jpg", str(tmp_path / "sub" / "c.jpg"), None),
        Item("/abs/d.jpg", "/abs/d.jpg", "y"),
    ]


# ------------------------------------------------------------------------------------------------
# List files: unambiguous formats


def _list(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _pairs(items) -> list[tuple[str, str | None]]:
    return [(it.id, it.label) for it in items]


def test_tab_separated_paths_and_labels_may_hold_spaces(tmp_path):
    lst = _list(tmp_path, "l.txt", "imgs/scenes/img_0003.jpg\tscene with space\nmy dir/a b.jpg\tcat\n")
    assert _pairs(list_items(lst)) == [("imgs/scenes/img_0003.jpg", "scene with space"), ("my dir/a b.jpg", "cat")]


def test_tsv_with_and_without_header(tmp_path):
    text = "path\tlabel\nimgs/a b.jpg\tthe label\nimgs/c d.jpg\n"
    assert _pairs(list_items(_list(tmp_path, "h.tsv", text))) == [("imgs/a b.jpg", "the label"), ("imgs/c d.jpg", None)]
    no_header = "imgs/a b.jpg\tx\n"
    assert _pairs(list_items(_list(tmp_path, "n.tsv", no_header))) == [("imgs/a b.jpg", "x")]
    named = "# comment\nfilename\tsplit\tlabel\na.jpg\ttrain\tcat\nb.jpg\ttest\tdog\n"
    assert _pairs(list_items(_list(tmp_path, "c.tsv", named))) == [("a.jpg", "cat"), ("b.jpg", "dog")]


def test_csv_with_header_quoting_and_extra_columns(tmp_path):
    text = 'path,label,width\n"imgs/a, b.jpg","scene, with comma",3\nimgs/c d.jpg,scene with space,4\ne.jpg,,5\n'
    assert _pairs(list_items(_list(tmp_path, "h.csv", text))) == [
        ("imgs/a, b.jpg", "scene, with comma"), ("imgs/c d.jpg", "scene with space"), ("e.jpg", None),
    ]  # fmt: skip
    text = "\ufeffFile,Label\nx.jpg,1\n"  # a spreadsheet's byte-order mark; header names in any case
    assert _pairs(list_items(_list(tmp_path, "f.csv", text))) == [("x.jpg", "1")]
    text = "img.jpg,cls\nother.jpg\n"  # no header: path[,label] as before
    assert _pairs(list_items(_list(tmp_path, "n.csv", text))) == [("img.jpg", "cls"), ("other.jpg", None)]


def test_csv_and_tab_lines_with_too_many_fields_are_errors(tmp_path):
    with pytest.raises(SourceError, match=r"n\.csv:2: 3 comma-separated fields.*header"):
        list_items(_list(tmp_path, "n.csv", "a.jpg,x\nb.jpg,x,y\n"))
    with pytest.raises(SourceError, match=r"t\.txt:1: 3 tab-separated fields"):
        list_items(_list(tmp_path, "t.txt", "a.jpg\tx\ty\n"))


# ------------------------------------------------------------------------------------------------
# List files: space-separated .txt/.lst lines


def test_space_separated_lines_that_read_one_way_only(tmp_path):
    _touch(tmp_path, "my img.jpg", "dir with space/x y.jpg")
    lst = _list(
        tmp_path,
        "l.lst",
        "plain.jpg\n"  # one token: a path
        "plain2.jpg   cls\n"  # path label, the path has no spaces (missing file: a read error later, as before)
        "my img.jpg\n"  # the whole line is an existing file
        "dir with space/x y.jpg  label\n"  # the path part is an existing file
        "  padded.jpg lab  \n",
    )
    assert _pairs(list_items(lst)) == [
        ("plain.jpg", None), ("plain2.jpg", "cls"), ("my img.jpg", None), ("dir with space/x y.jpg", "label"),
        ("padded.jpg", "lab"),
    ]  # fmt: skip


def test_ambiguous_space_separated_line_is_an_error(tmp_path):
    _touch(tmp_path, "imgs/scenes/img_0003.jpg")
    lst = _list(
        tmp_path, "list.txt", "# header\nimgs/scenes/img_0001.jpg a\nimgs/scenes/img_0003.jpg scene with space\n"
    )
    with pytest.raises(SourceError) as exc:
        list_items(lst)
    msg = str(exc.value)
    assert f"{lst}:3:" in msg and "ambiguous" in msg and "tab" in msg and ".tsv" in msg and ".csv" in msg
    assert "\n" not in msg  # one line for the CLI


def test_duplicate_path_in_a_list_is_an_error(tmp_path):
    with pytest.raises(SourceError, match=r"l\.txt:3: duplicate path 'a\.jpg'"):
        list_items(_list(tmp_path, "l.txt", "a.jpg\tx\nb.jpg\na.jpg\ty\n"))


# ------------------------------------------------------------------------------------------------
# Read errors name what was read


def test_missing_file_error_names_the_path(tmp_path):
    path = str(tmp_path / "gone dir" / "img.jpg")
    with pytest.raises(FileNotFoundError) as exc:
        ItemReader().read(Item("img.jpg", path, None))
    assert path in exc.value.strerror and path in str(exc.value) and exc.value.errno == 2
    _, _, (stage, message, cause) = read_image(Item("img.jpg", path, None), 10**9)
    assert stage == "read" and message == f"No such file or directory: {path!r}" and cause == "missing"


def test_permission_denied_is_not_the_images_fault_and_names_the_path(tmp_path, monkeypatch):
    """Not a bad image (the setup's: a rerun once it is fixed picks the image up): ReadFault, never a
    record, and not retried (it would not pass)."""
    _touch(tmp_path, "locked.jpg")
    path = str(tmp_path / "locked.jpg")
    calls = []

    def denied(file, *args, **kw):
        calls.append(file)
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr(sources.reader, "open", denied, raising=False)
    with pytest.raises(ReadFault) as exc:
        read_image(Item("locked.jpg", path, None), 10**9)
    assert str(exc.value) == f"Permission denied: {path!r} (1 attempt)" and len(calls) == 1


def test_directory_and_too_large_errors_name_the_path(tmp_path, monkeypatch):
    _touch(tmp_path, "big.jpg", data=b"x" * 100)
    (tmp_path / "dir.jpg").mkdir()
    _, _, (_, message, cause) = read_image(Item("dir.jpg", str(tmp_path / "dir.jpg"), None), 10**9)
    assert message == f"Is a directory: {str(tmp_path / 'dir.jpg')!r}" and cause == "not_image"
    monkeypatch.setattr(sources.reader, "MAX_FILE_BYTES", 50)
    _, _, (_, message, cause) = read_image(Item("big.jpg", str(tmp_path / "big.jpg"), None), 10**9)
    assert message == f"file too large: 100 bytes (limit 50): {str(tmp_path / 'big.jpg')!r}" and cause == "too_large"


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_read_errors_name_the_shard_and_member(tmp_path):
    shard = str(tmp_path / "s-0.tar")
    _tar(shard, {"k1.jpg": b"a" * 2000, "k1.cls": b"3", "../evil.jpg": b"b"})
    items = list_items(shard)
    assert _pairs(items) == [("../evil.jpg", None), ("k1", "3")]
    with pytest.raises(OSError, match=r"unsafe tar member path '\.\./evil\.jpg' in .*s-0\.tar"):
        ItemReader().read(items[0])
    good = items[1]
    assert ItemReader().read(good) == b"a" * 2000
    with open(shard, "r+b") as f:  # cut the shard inside the member's data
        f.truncate(good.offset + 10)
    _, _, (stage, message, cause) = read_image(good, 10**9)
    assert stage == "read" and message.startswith("truncated tar member: 10 of 2000 bytes") and cause == "corrupt"
    assert repr(good.path) in message and "'k1'" in message
    os.remove(shard)
    _, _, (_, message, cause) = read_image(good, 10**9)
    assert (
        cause == "missing"
        and message.startswith("No such file or directory: ")
        and repr(good.path) in message
        and "'k1'" in message
    )


def test_parquet_read_errors_name_the_file_and_row(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"image": pa.array([b"abc", b""], pa.binary()), "label": [1, 2]}), path)
    items = list_items(path)
    assert _pairs(items) == [("d.parquet:0", "1"), ("d.parquet:1", "2")] and items[1].offset == 1
    reader = ItemReader()
    assert reader.read(items[0]) == b"abc"
    _, _, (_, message, cause) = read_image(items[1], 10**9, reader=reader)
    assert message == f"empty image bytes: {path!r} row 1" and cause == "not_image"
    with open(path, "r+b") as f:  # a damaged file: pyarrow's own error, as an OSError naming file and row
        f.truncate(20)
    _, _, (stage, message, cause) = read_image(items[0], 10**9, reader=ItemReader())
    assert stage == "read" and message.endswith(f"{path!r} row 0") and cause == "corrupt"
    os.remove(path)
    _, _, (_, message, cause) = read_image(items[0], 10**9, reader=ItemReader())
    assert message.endswith(f"{path!r} row 0") and cause == "missing"


@pytest.mark.parametrize("every", [3, 10_000])
def test_random_tree_matches_an_os_walk_listing(tmp_path, monkeypatch, every):
    """Names around '/' in byte order ('-' '.' '0' ' ' '~', non-ASCII), folders named like images,
    several depths; small chunks exercise the per-chunk classification and progress."""
    import random

    monkeypatch.setattr(sources.folder, "PROGRESS_EVERY", every)
    rng = random.Random(7)
    parts = ["a", "a-b", "a.b", "a0", "a b", "a~", "é", "Z", "x.jpg", "b.PNG"]
    for _ in range(300):
        depth = rng.randint(0, 3)
        path = [rng.choice(parts) for _ in range(depth)] + [
            rng.choice(parts) + rng.choice([".jpg", ".png", ".txt", ""])
        ]
        try:
            _touch(tmp_path, "/".join(path))
        except (IsADirectoryError, NotADirectoryError, FileExistsError):
            pass  # a name already taken by a file or a folder
    expected = []
    for dirpath, _dirnames, filenames in os.walk(tmp_path):
        for f in filenames:
            if os.path.splitext(f)[1].lower() in sources.IMAGE_EXTENSIONS:
                rel = os.path.relpath(os.path.join(dirpath, f), tmp_path).replace(os.sep, "/")
                expected.append((rel, rel.split("/")[0] if "/" in rel else None))
    expected.sort(key=lambda p: p[0].encode("utf-8"))
    calls: list[int] = []
    items = list_items(str(tmp_path), progress=calls.append)
    assert len(expected) > 50 and _pairs(items) == expected
    assert calls[-1] == len(items) and calls == sorted(calls)
    assert all(it.path == os.path.join(str(tmp_path), it.id) for it in items)
