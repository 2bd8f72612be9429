"""Published weights by name: ``--weights caffenet-imagenet`` downloads the file once, checks it, caches it.

Each name in :data:`PUBLISHED` records where the file is published, its file name, its size and the
checksum its publisher gives, of the kind the publisher gives:

* torchvision names its files ``<name>-<first 8 hex digits of the sha256>.pth`` and ``torch.hub``
  checks that prefix: ``sha256-prefix``;
* BVLC's model zoo readme gives the full ``sha1`` of each ``.caffemodel``;
* the seed papers' other networks (CNN-F/M/S, OverFeat) are published with neither a checksum nor a size:
  ``none``.  Those names are listed with their URL and where it is published, but never downloaded: a file
  that cannot be checked is not cached under a published name (``fetch`` says what to download by hand and
  to pass as ``--weights FILE``).

A download goes to ``<cache>/weights/<file>.<pid>.part``, is checked (size, then that checksum) and
only then renamed to ``<cache>/weights/<file>``; a partial, truncated or corrupt download never
becomes the cached file.  Downloads of one file are serialised by an ``fcntl`` lock on
``<file>.lock`` beside it, so processes that start at once download it once.  A cached file is
checked again (one streamed pass, which also gives the sha256 that goes into every output's
metadata) each time a process first uses it.

``<cache>`` is ``$FASTFEAT_CACHE``, else ``$XDG_CACHE_HOME/fastfeat``, else ``~/.cache/fastfeat``.
``$FASTFEAT_WEIGHTS_MIRROR`` (a base URL: ``https://``, ``http://`` or ``file://``) replaces the
origin: the file is fetched from ``<mirror>/<file>`` and checked against the same published checksum.
timm's hub weights (``timm:ARCH.TAG``, fastfeat.hub_weights) take their sha256 and size from the hub's API
at a pinned commit, and ``$HF_ENDPOINT`` replaces the hub instead.

Importing this module imports nothing heavy (the CLI lists names before torch is loaded).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import math
import os
import sys
from dataclasses import dataclass

from .errors import ConfigError, DownloadError
from .version import __version__

CACHE_ENV = "FASTFEAT_CACHE"
MIRROR_ENV = "FASTFEAT_WEIGHTS_MIRROR"
TIMEOUT_S = 60.0  # per socket operation (connect, each read): a stalled server fails, a slow one does not
CHUNK = 1 << 20
MIB = 1 << 20


@dataclass(frozen=True)
class PublishedWeights:
    name: str  # what --weights takes
    model: str  # the fastfeat model these weights are for
    url: str  # where the publisher serves the file
    file: str  # its published file name, also its name in the cache
    checksum_kind: str  # "sha256" (full), "sha256-prefix" (the leading hex digits), "sha1" (full) or "none"
    checksum: str  # lower-case hex, as published ("" for none)
    size: int | None  # exact bytes, where published; checked exactly
    size_mib: float | None  # published size in MiB (torchvision: 3 decimals); checked within SIZE_SLACK_MIB if no size
    published_in: str  # where the URL, checksum and size are published
    # timm's hub weights (fastfeat.hub_weights): (repo, revision asked, file); checksum, size and commit are
    # filled in by fetch from the hub's paths-info answer (or the record of it beside the cached file)
    hub: tuple[str, str, str] | None = None
    commit: str | None = None  # the pinned hub commit the file is fetched from

    def expected_bytes(self) -> tuple[int, int]:
        """The smallest and largest size a good file can have."""
        if self.size is not None:
            return self.size, self.size
        return math.floor((self.size_mib - SIZE_SLACK_MIB) * MIB), math.ceil((self.size_mib + SIZE_SLACK_MIB) * MIB)

    def describe_checksum(self) -> str:
        if not self.verifiable:
            return "no checksum or size published"
        return f"{self.checksum_kind.replace('-', ' ')} {self.checksum}"

    @property
    def verifiable(self) -> bool:
        """A download can be checked (and so is made); False for names listed with their URL only."""
        return self.checksum_kind != "none"


# torchvision's published sizes are MiB rounded to 3 decimals (its "_file_size"): a good file is within
# 0.0005 MiB of it; the slack also covers truncation instead of rounding.  The checksum decides anyway.
SIZE_SLACK_MIB = 0.01
CHECKSUM_KINDS = ("sha256", "sha256-prefix", "sha1", "none")

PUBLISHED: dict[str, PublishedWeights] = {}


def register_published(entry: PublishedWeights) -> PublishedWeights:
    if entry.name in PUBLISHED:
        raise ValueError(f"published weights {entry.name!r} are registered twice")
    if entry.checksum_kind not in CHECKSUM_KINDS:
        raise ValueError(f"{entry.name}: unknown checksum kind {entry.checksum_kind!r}")
    if (entry.checksum_kind == "none") != (not entry.checksum and entry.size is None and entry.size_mib is None):
        raise ValueError(f"{entry.name}: checksum kind none goes with no checksum and no size, and only with them")
    PUBLISHED[entry.name] = entry
    return entry


register_published(
    PublishedWeights(
        name="caffenet-imagenet",
        model="caffenet",
        url="http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel",
        file="bvlc_reference_caffenet.caffemodel",
        checksum_kind="sha1",
        checksum="4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46",
        size=243_862_418,
        size_mib=243_862_418 / MIB,
        published_in="URL and sha1: BVLC/caffe models/bvlc_reference_caffenet/readme.md (licence: unrestricted use); "
        "size: openvinotoolkit/open_model_zoo models/public/caffenet/model.yml",
    )
)
register_published(
    PublishedWeights(
        name="alexnet-imagenet",
        model="alexnet",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        file="alexnet-owt-7be5be79.pth",
        checksum_kind="sha256-prefix",
        checksum="7be5be79",
        size=None,
        size_mib=233.087,
        published_in="torchvision torchvision/models/alexnet.py AlexNet_Weights.IMAGENET1K_V1 (url, _file_size; "
        "the sha256 prefix is the file name's suffix, as torch.hub checks it)",
    )
)
register_published(
    PublishedWeights(
        name="vgg16-imagenet",
        model="vgg16",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        file="vgg16-397923af.pth",
        checksum_kind="sha256-prefix",
        checksum="397923af",
        size=None,
        size_mib=527.796,
        published_in="torchvision torchvision/models/vgg.py VGG16_Weights.IMAGENET1K_V1 (url, _file_size; "
        "the sha256 prefix is the file name's suffix, as torch.hub checks it)",
    )
)


# -- the seed papers' other networks: URLs as published, no checksum or size published anywhere read ----------
# Chatfield et al. 2014 (BMVC), Caffe release: the ksimonyan model-zoo gists (readme fields caffemodel_url,
# mean_file_proto, licence "non-commercial use only"; gists a32c9063ec8e1118221a CNN_F, f194575702fae63b2829
# CNN_M, fd8800eeb36e276cd6f9 CNN_S, read as copied in weihancug/SSGF-for-HRRS-scene-classification
# model_protext/VGG_{F,M,S}/readme.md).  The mean image for all three: VGG_MEAN_URL (pass it as --mean-file).
VGG_DEEP_EVAL = "http://www.robots.ox.ac.uk/~vgg/software/deep_eval/releases/bvlc"
VGG_MEAN_URL = f"{VGG_DEEP_EVAL}/VGG_mean.binaryproto"
for _net, _gist in (("F", "a32c9063ec8e1118221a"), ("M", "f194575702fae63b2829"), ("S", "fd8800eeb36e276cd6f9")):
    register_published(
        PublishedWeights(
            name=f"cnn-{_net.lower()}-caffe",
            model=f"cnn-{_net.lower()}",
            url=f"{VGG_DEEP_EVAL}/VGG_CNN_{_net}.caffemodel",
            file=f"VGG_CNN_{_net}.caffemodel",
            checksum_kind="none", checksum="", size=None, size_mib=None,
            published_in=f"BVLC model zoo gist ksimonyan/{_gist} readme (caffemodel_url; mean {VGG_MEAN_URL}); "
            "licence: non-commercial use only; no checksum or size published",
        )
    )  # fmt: skip
# MatConvNet's conversions (vlfeat/matconvnet doc/site/docs/pretrained.md lists models/imagenet-vgg-*.mat under
# http://www.vlfeat.org/matconvnet/; utils/import-ref-models.sh makes them from the deep_eval release).
for _model, _file in (("cnn-f", "f"), ("cnn-m", "m"), ("cnn-s", "s"), ("cnn-m-2048", "m-2048")):
    register_published(
        PublishedWeights(
            name=f"{_model}-matconvnet",
            model=_model,
            url=f"http://www.vlfeat.org/matconvnet/models/imagenet-vgg-{_file}.mat",
            file=f"imagenet-vgg-{_file}.mat",
            checksum_kind="none", checksum="", size=None, size_mib=None,
            published_in="vlfeat/matconvnet doc/site/docs/pretrained.md (its mean image is in the file: pass the "
            "same file as --mean-file); no checksum or size published",
        )
    )  # fmt: skip
# OverFeat: one archive holding both networks' raw files (sermanet/OverFeat download_weights.py).
for _model, _file in (("overfeat-fast", "net_weight_0"), ("overfeat-accurate", "net_weight_1")):
    register_published(
        PublishedWeights(
            name=f"{_model}-imagenet",
            model=_model,
            url="http://cilvr.cs.nyu.edu/lib/exe/fetch.php?media=overfeat:overfeat-weights.tgz",
            file=_file,
            checksum_kind="none", checksum="", size=None, size_mib=None,
            published_in=f"sermanet/OverFeat download_weights.py (overfeat-weights.tgz: extract {_file} from it); "
            "licence: sermanet/OverFeat LICENSE; no checksum or size published",
        )
    )  # fmt: skip


# What --weights takes, for messages.
WEIGHTS_CHOICES = (
    f"--weights takes a .pth, .safetensors, .caffemodel or MatConvNet .mat file (OverFeat: its net_weight_0/1), a published name ({', '.join(PUBLISHED)}), "
    "torchvision's (ResNet50_Weights.IMAGENET1K_V2) or timm's (timm:ARCH.TAG) published weights, or random:SEED"
)


def lookup(source: str | None) -> PublishedWeights | None:
    """The registered entry named ``source`` (or a torchvision weights name, fastfeat.zoo_weights, or timm's
    ``timm:ARCH.TAG``, fastfeat.hub_weights: not pinned yet), or None (a file path or ``random:SEED``)."""
    if not source:
        return None
    if source in PUBLISHED:
        return PUBLISHED[source]
    from .hub_weights import hub_entry, is_hub_weights_name

    if is_hub_weights_name(source):
        return PublishedWeights(**hub_entry(source))
    from .zoo_weights import is_torchvision_weights_name, torchvision_entry

    fields = torchvision_entry(source) if is_torchvision_weights_name(source) else None
    return PublishedWeights(**fields) if fields is not None else None


def check_model(entry: PublishedWeights, model: str) -> None:
    if entry.model.startswith("torchvision:") and model.startswith("torchvision:"):
        import torchvision.models as tvm  # the same weights enum serves e.g. resnet50 under several names

        if tvm.get_model_weights(model.split(":", 1)[1]) is type(tvm.get_weight(entry.name)):
            return
    if entry.hub is not None:
        from .hub_weights import same_architecture

        if same_architecture(entry.model, model):
            return
    if entry.model != model:
        raise ConfigError(
            f"--weights {entry.name} are {entry.model} weights, not {model}: add --model {entry.model} "
            f"(or choose {', '.join(n for n, e in PUBLISHED.items() if e.model == model) or 'a weights file'})"
        )


def cache_dir() -> str:
    """``$FASTFEAT_CACHE``, else ``$XDG_CACHE_HOME/fastfeat``, else ``~/.cache/fastfeat``."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "fastfeat")


def cached_path(entry: PublishedWeights) -> str:
    """Where ``entry``'s file is (or will be) cached; a file put there by hand is used once it checks out."""
    return os.path.join(cache_dir(), "weights", entry.file)


def download_url(entry: PublishedWeights) -> str:
    """The origin URL, or ``$FASTFEAT_WEIGHTS_MIRROR/<file>`` (a hub entry's URL is already on ``$HF_ENDPOINT``)."""
    if entry.hub is not None:
        from .hub_weights import download_url as hub_download_url

        return hub_download_url(entry)
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return entry.url
    if not mirror.startswith(("https://", "http://", "file://")):
        raise ConfigError(f"{MIRROR_ENV}={mirror!r}: expected a base URL starting with https://, http:// or file://")
    return mirror.rstrip("/") + "/" + entry.file


# path -> ((size, mtime_ns, inode), sha256) of files this process has checked
_CHECKED: dict[str, tuple[tuple[int, int, int], str]] = {}


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


class _Digests:
    """sha256 (for the metadata) and, when it is the published kind, sha1, in one pass."""

    def __init__(self, entry: PublishedWeights):
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1() if entry.checksum_kind == "sha1" else None
        self.entry = entry

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def problem(self, size: int) -> str | None:
        """Why a file of ``size`` bytes with these digests is not the published one, or None."""
        lo, hi = self.entry.expected_bytes()
        if not lo <= size <= hi:
            expected = f"{lo:,}" if lo == hi else f"about {self.entry.size_mib:.3f} MiB"
            return f"it has {size:,} bytes, the published file {expected}"
        kind, want = self.entry.checksum_kind, self.entry.checksum
        got = self.sha1.hexdigest() if kind == "sha1" else self.sha256.hexdigest()
        if (got[: len(want)] if kind == "sha256-prefix" else got) != want:
            return (
                f"its {'sha1' if kind == 'sha1' else 'sha256'} is {got}, the published {self.entry.describe_checksum()}"
            )
        return None


def _check_file(entry: PublishedWeights, path: str) -> tuple[str | None, str]:
    """(why it is not the published file or None, its sha256)."""
    digests = _Digests(entry)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digests.update(chunk)
            size += len(chunk)
    return digests.problem(size), digests.sha256.hexdigest()


def _by_hand(entry: PublishedWeights, url: str) -> str:
    if entry.hub is not None:  # the cached file is checked against the hub's answer recorded beside it
        path = cached_path(entry)
        return (
            f"download {url} by hand and save it as {path} (checked once the hub can be asked), or run "
            f"`fastfeat weights download {entry.name}` where it can and copy {path} and {path}.json here, "
            "or pass --weights FILE"
        )
    origin = f" (or {entry.url})" if url != entry.url else ""
    return f"download {url}{origin} by hand and save it as {cached_path(entry)}, or pass --weights FILE"


def _verified_cached(entry: PublishedWeights, path: str) -> str:
    """The sha256 of the cached file once it checks out; DownloadError (never deleting it) when not."""
    stamp = _stamp(path)
    known = _CHECKED.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    problem, sha256 = _check_file(entry, path)
    if problem is not None:
        raise DownloadError(
            f"{path} is not the published {entry.name} file ({problem}); delete it to download it again, "
            f"or replace it with {entry.url}"
        )
    _CHECKED[path] = (stamp, sha256)
    return sha256


def _lock(lock, entry: PublishedWeights, log) -> None:
    """Take the exclusive lock of ``entry``'s download (released when ``lock`` is closed or the process dies)."""
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"fastfeat: waiting for another process downloading {entry.name} into {os.path.dirname(lock.name)}")
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fetch(entry: PublishedWeights, log=_stderr) -> tuple[str, str]:
    """(path of the checked cached file, its sha256): downloaded first when it is not cached yet."""
    return fetch_pinned(entry, log)[:2]


def fetch_pinned(entry: PublishedWeights, log=_stderr) -> tuple[str, str, PublishedWeights]:
    """fetch, and the entry as checked (a hub entry with its sha256, size and commit)."""
    if not entry.verifiable:
        raise DownloadError(
            f"{entry.name}: no checksum or size is published, so fastfeat does not download or cache it; "
            f"download {entry.url} by hand ({entry.published_in.split(' (')[0]}) and pass --weights FILE"
        )
    path = cached_path(entry)
    if entry.hub is not None:
        entry = _pin_hub(entry, path, _by_hand(entry, download_url(entry)))
    if os.path.isfile(path):
        sha256 = _verified_cached(entry, path)
        if entry.hub is not None and not os.path.isfile(path + ".json"):  # saved by hand, now checked
            from .hub_weights import write_record

            with contextlib.suppress(OSError):
                write_record(entry, path)
        return path, sha256, entry
    url = download_url(entry)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(path + ".lock", "a+b")  # closed by the with below
    except OSError as exc:
        raise DownloadError(
            f"cannot write the weights cache {folder} ({exc.strerror or exc}): set {CACHE_ENV} to a writable "
            f"folder, or {_by_hand(entry, url)}"
        ) from None
    with lock:
        _lock(lock, entry, log)
        if os.path.isfile(path):  # another process finished the download while this one waited
            return path, _verified_cached(entry, path), entry
        for stale in glob.glob(glob.escape(path) + ".*.part"):  # left by a killed download: we hold the lock
            with contextlib.suppress(OSError):
                os.remove(stale)
        if entry.hub is not None:  # the pinned answer first: a file in the cache always has its record
            from .hub_weights import write_record

            try:
                write_record(entry, path)
            except OSError as exc:
                raise DownloadError(
                    f"cannot write {path}.json ({exc.strerror or exc}); {_by_hand(entry, url)}"
                ) from None
        try:
            sha256 = _download(entry, url, path, log)
        except DownloadError:
            if entry.hub is not None:  # nothing cached: no file, no record
                with contextlib.suppress(OSError):
                    os.remove(path + ".json")
            raise
        _CHECKED[path] = (_stamp(path), sha256)
        return path, sha256, entry


def _pin_hub(entry: PublishedWeights, path: str, by_hand: str) -> PublishedWeights:
    """A hub entry with its sha256, size and commit (fastfeat.hub_weights): from the record beside the
    cached file when both are there (nothing asked), else from the hub's paths-info answer."""
    from . import hub_weights

    if (pinned := hub_weights.recorded(entry, path)) is not None:
        return pinned
    api, form = hub_weights.paths_info_request(entry)
    try:
        answer = _post_json(api, form)
    except DownloadError as exc:
        raise hub_weights.unreachable(entry, path, api, str(exc), by_hand) from None
    return hub_weights.pin_from_answer(entry, answer, api, by_hand)


def _post_json(url: str, form: dict, limit: int = 1 << 20):
    """The JSON answer to a form POST (at most ``limit`` bytes); DownloadError carrying the short reason."""
    import http.client
    import json
    import urllib.parse
    import urllib.request

    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"User-Agent": f"fastfeat/{__version__}", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body = response.read(limit + 1)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadError(_reason(exc)) from None
    if len(body) > limit:
        raise DownloadError(f"its answer is larger than {limit:,} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise DownloadError("its answer is not JSON") from None


def _download(entry: PublishedWeights, url: str, path: str, log) -> str:
    """Stream ``url`` into ``<path>.<pid>.part``, check it, rename it to ``path``; its sha256."""
    import http.client
    import urllib.request

    from tqdm import tqdm

    tmp = f"{path}.{os.getpid()}.part"
    lo, hi = entry.expected_bytes()
    digests, size = _Digests(entry), 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"fastfeat/{__version__}"})
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        # Only once the server answers: offline, the error below is the one line printed.
        log(f"fastfeat: downloading {entry.name} ({entry.size_mib:.1f} MiB) from {url} into {path}")
        with (
            response,
            open(tmp, "wb") as out,
            tqdm(
                total=hi if lo == hi else round(entry.size_mib * MIB), unit="B", unit_scale=True, unit_divisor=1024,
                desc=entry.name, file=sys.stderr, disable=None, leave=False,
            ) as bar,
        ):  # fmt: skip
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > hi:  # a wrong or endless file: stop reading, never fill the disk
                    break
                digests.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
            announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and size < int(announced):  # http.client's read(n) takes an early close for EOF
            raise http.client.IncompleteRead(b"\0" * size, int(announced) - size)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise DownloadError(
            f"cannot download {entry.name} from {url} ({_reason(exc)}); {_by_hand(entry, url)}"
        ) from None
    problem = digests.problem(size) if size <= hi else f"it is larger than the published {hi:,} bytes"
    if problem is not None:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise DownloadError(
            f"the download of {entry.name} from {url} is not the published file ({problem}); nothing was cached: "
            f"try again, or {_by_hand(entry, url)}"
        )
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    log(f"fastfeat: {entry.name} checked ({entry.describe_checksum()}) and cached as {path}")
    return digests.sha256.hexdigest()


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a failed download."""
    import http.client
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    if isinstance(exc, http.client.IncompleteRead):
        announced = f" of the {len(exc.partial) + exc.expected:,}" if exc.expected is not None else " of the"
        return f"the connection closed after {len(exc.partial):,}{announced} announced bytes"
    if isinstance(exc, TimeoutError):
        return f"no data for {TIMEOUT_S:g} s"
    text = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).splitlines()[0]
    return text


def resolve(source: str, model: str, log=_stderr) -> tuple[str, str, PublishedWeights] | None:
    """For a published name: (path of the checked cached file, its sha256, the entry as checked: a hub
    entry carries its commit), downloading it first if needed; None for anything else (a file path,
    ``random:SEED``)."""
    entry = lookup(source)
    if entry is None:
        return None
    check_model(entry, model)
    return fetch_pinned(entry, log)


def describe(entry: PublishedWeights) -> dict:
    """What ``fastfeat weights list`` shows of one entry."""
    path = cached_path(entry)
    return {
        "name": entry.name,
        "model": entry.model,
        "file": entry.file,
        "size_bytes": entry.size,
        "size_mib": round(entry.size_mib, 3) if entry.size_mib is not None else None,
        "checksum_kind": entry.checksum_kind,
        "checksum": entry.checksum,
        "url": entry.url,
        "download_url": download_url(entry),
        "published_in": entry.published_in,
        "cached": os.path.isfile(path),
        "path": path,
    }


def format_list(rows: list[dict]) -> str:
    """The table of ``fastfeat weights list``."""
    lines = []
    for r in rows:
        if r["checksum_kind"] == "none":
            lines.append(
                f"{r['name']:<18} {r['model']:<9} {'size ?':>10}  listed only: download by hand, pass --weights FILE"
            )
            lines.append(f"{'':<18} no checksum or size published  from {r['url']}")
            continue
        where = f"cached: {r['path']}" if r["cached"] else f"not cached (downloaded on first use to {r['path']})"
        size = f"{r['size_mib']:.1f} MiB"
        lines.append(f"{r['name']:<26} {r['model']:<17} {size:>10}  {where}")
        lines.append(f"{'':<26} {r['checksum_kind']} {r['checksum']}  from {r['url']}")
        if r["download_url"] != r["url"]:
            lines.append(f"{'':<26} mirror: {r['download_url']}")
    lines.append(f"cache: {os.path.join(cache_dir(), 'weights')} (${CACHE_ENV}); mirror: ${MIRROR_ENV}")
    return "\n".join(lines)
