"""timm's published weights by name (``--weights timm:vit_small_patch16_224.augreg_in21k_ft_in1k``), from
the Hugging Face hub, through the verified cache of fastfeat.published.

timm's pretrained configuration names the hub repository (``hf_hub_id``) and, where it is not
``model.safetensors``, the file; its configurations carry no checksum, but the hub publishes one for every
LFS file: ``POST {endpoint}/api/models/{repo}/paths-info/{revision}`` (form ``paths=FILE&expand=true``)
answers ``[{"path", "type": "file", "lfs": {"oid": SHA256, "size": BYTES}, "lastCommit": {"id": COMMIT}}]``
(what ``huggingface_hub.get_paths_info`` reads).  fastfeat asks once, pins the commit (the file is then
fetched from ``{endpoint}/{repo}/resolve/{COMMIT}/{FILE}``, so it is the file that answer describes, not
a later push), and records the answer beside the cached file as ``<file>.json``; a later run, offline
included, checks the cached file against that record and asks nothing.  Delete both to take a newer commit.

Only ``.safetensors`` files are fetched (a pickle is never unpickled): a configuration naming a ``.bin`` or
``.pth`` file is mapped to its safetensors sibling as timm maps it, and a repository without one is refused.

``$HF_ENDPOINT`` (the variable huggingface_hub and timm read) replaces ``https://huggingface.co``: a hub
mirror serves the hub's API and ``/resolve/`` paths in the hub's layout, which the flat folder of
``$FASTFEAT_WEIGHTS_MIRROR`` (``<mirror>/<file>``) cannot, and one setting then points timm and fastfeat at
the same mirror.  ``$FASTFEAT_WEIGHTS_MIRROR`` does not apply to hub names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from functools import lru_cache

from .errors import ConfigError, DownloadError

PREFIX = "timm:"
ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_weights_name(source: str | None) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX) and len(source) > len(PREFIX)


def endpoint() -> str:
    """``$HF_ENDPOINT`` without its trailing slash, else the hub."""
    value = os.environ.get(ENDPOINT_ENV, "").strip().rstrip("/")
    if not value:
        return DEFAULT_ENDPOINT
    if not value.startswith(("https://", "http://")):
        raise ConfigError(f"{ENDPOINT_ENV}={value!r}: expected a base URL starting with https:// or http://")
    return value


def _safetensors_file(name: str | None) -> str:
    """The safetensors file timm would load for a configured hub file name (timm's _get_safe_alternatives)."""
    if not name:
        return "model.safetensors"
    if name.endswith(".safetensors"):
        return name
    if name == "open_clip_pytorch_model.bin":
        return "open_clip_model.safetensors"
    if name == "pytorch_model.bin":
        return "model.safetensors"
    return name.rsplit(".", 1)[0] + ".safetensors"


@lru_cache(maxsize=64)
def _timm_source(name: str) -> tuple[str, str, str, str, str]:
    """(architecture, tag, hub repo, revision asked, safetensors file) of timm's ``ARCH[.TAG]``."""
    from .zoo import TIMM_MISSING

    try:
        import timm.models
    except ImportError:
        raise ConfigError(TIMM_MISSING) from None
    arch, tag = timm.models.split_model_name_tag(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name) if timm.models.is_model(arch) else None
    except RuntimeError:  # timm: "Invalid pretrained tag (TAG) for ARCH."
        cfg = None
    if cfg is None:
        raise ConfigError(f"unknown timm weights {PREFIX}{name} (timm.list_pretrained() lists ARCH.TAG names)")
    tag = tag or getattr(cfg, "tag", "") or ""
    if not cfg.hf_hub_id:
        raise ConfigError(
            f"timm weights {PREFIX}{name} are not published on the hub (timm gives only {cfg.url or 'no URL'}): "
            "save a state dict as .safetensors and pass --weights FILE"
        )
    repo, _, revision = cfg.hf_hub_id.partition("@")
    return arch, tag, repo, revision or "main", _safetensors_file(cfg.hf_hub_filename)


def hub_entry(source: str) -> dict | None:
    """The PublishedWeights fields of ``timm:ARCH.TAG`` (``timm:ARCH``: timm's default tag) before the hub is
    asked (checksum and size still unknown: fastfeat.published.fetch pins them); None for another name;
    ConfigError (one line) for weights timm does not know or does not publish on the hub."""
    if not is_hub_weights_name(source):
        return None
    arch, tag, repo, revision, file = _timm_source(source[len(PREFIX) :])
    return dict(
        name=source,
        model=f"timm:{arch}",
        url=f"{DEFAULT_ENDPOINT}/{repo}/resolve/{revision}/{file}",  # the publisher's; download_url: the mirror's
        file=f"{repo.replace('/', '--')}--{file}",
        checksum_kind="sha256",
        checksum="",
        size=None,
        size_mib=None,
        published_in=f"timm {arch}.{tag}: the Hugging Face hub {repo} {file} (sha256 and size: the hub's paths-info)",
        hub=(repo, revision, file),
    )


def download_url(entry) -> str:
    """The entry's hub URL on ``$HF_ENDPOINT``."""
    return endpoint() + entry.url[len(DEFAULT_ENDPOINT) :]


def same_architecture(entry_model: str, model: str) -> bool:
    """timm weights ``timm:ARCH`` fit ``--model timm:ARCH`` and ``timm:ARCH.TAG`` (the tag sets the head)."""
    return model.startswith(PREFIX) and model[len(PREFIX) :].split(".", 1)[0] == entry_model[len(PREFIX) :]


def record_path(path: str) -> str:
    return path + ".json"


def _read_record(path: str) -> dict | None:
    try:
        with open(record_path(path), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(record, dict)
        and _SHA256.match(str(record.get("sha256", "")))
        and _COMMIT.match(str(record.get("commit", "")))
        and isinstance(record.get("size"), int)
    )
    return record if ok else None


def write_record(entry, path: str) -> None:
    """Record the pinned hub answer beside the cached file (written whole, then renamed into place)."""
    repo, revision, file = entry.hub
    record = {"repo": repo, "revision": revision, "file": file, "commit": entry.commit,
              "sha256": entry.checksum, "size": entry.size, "url": entry.url}  # fmt: skip
    tmp = f"{record_path(path)}.{os.getpid()}.part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, record_path(path))


def _pinned(entry, record: dict):
    repo, _, file = entry.hub
    return replace(
        entry,
        url=f"{DEFAULT_ENDPOINT}/{repo}/resolve/{record['commit']}/{file}",
        checksum=record["sha256"],
        size=record["size"],
        size_mib=record["size"] / (1 << 20),
        commit=record["commit"],
    )


def recorded(entry, path: str):
    """``entry`` pinned by the record beside the cached file ``path`` when both are there, else None."""
    if entry.commit is not None:
        return entry
    if os.path.isfile(path) and (record := _read_record(path)) is not None:
        return _pinned(entry, record)
    return None


def paths_info_request(entry) -> tuple[str, dict]:
    """(the paths-info URL on ``$HF_ENDPOINT``, the form to POST to it) for ``entry``'s file."""
    repo, revision, file = entry.hub
    return f"{endpoint()}/api/models/{repo}/paths-info/{revision}", {"paths": file, "expand": "true"}


def unreachable(entry, path: str, api: str, reason: str, by_hand: str) -> DownloadError:
    """The one line for a hub that cannot be asked (``reason``)."""
    if os.path.isfile(path):
        return DownloadError(
            f"{path} has no record of the hub's sha256 ({record_path(path)}) and {api} cannot be reached "
            f"({reason}): connect once to check it, or pass --weights {path} to use it unchecked"
        )
    return DownloadError(f"cannot ask the hub for {entry.name}: {api} ({reason}); {by_hand}")


def pin_from_answer(entry, answer, api: str, by_hand: str):
    """``entry`` with the sha256, size and commit of the paths-info ``answer``; DownloadError (one line)
    when it lists no such file, or publishes no sha256, size or commit for it."""
    repo, revision, file = entry.hub
    items = answer if isinstance(answer, list) else []
    item = next((i for i in items if isinstance(i, dict) and i.get("path") == file and i.get("type") == "file"), None)
    if item is None:
        raise DownloadError(
            f"{repo} has no {file} at {revision} ({api}); fastfeat fetches .safetensors only, never a pickle"
        )
    lfs, commit = item.get("lfs") or {}, (item.get("lastCommit") or {}).get("id", "")
    sha256, size = str(lfs.get("oid", "")), lfs.get("size")
    if not _SHA256.match(sha256) or not isinstance(size, int):
        raise DownloadError(f"{api} publishes no sha256 and size for {file} (not an LFS file); {by_hand}")
    if not _COMMIT.match(str(commit)):
        raise DownloadError(f"{api} names no commit for {file} (lastCommit.id); {by_hand}")
    return _pinned(entry, {"sha256": sha256, "size": size, "commit": commit})
