"""Omniglot with the Vinyals split, as Prototypical Networks (and the paper, Section 3.2) use it.

The data are the two official archives (105x105 1-bit PNGs) and four class lists. A class is one
character at one rotation (rot000/090/180/270, counter-clockwise), so 1623 characters give 6492
classes; each has the same 20 drawers.

Preprocessing, as the reference pipeline: rotate the 105x105 image, resize it to 28x28 with
nearest-neighbour sampling (Pillow's only choice for 1-bit images), then strokes -> 1.0,
background -> 0.0: float32 (1, 28, 28).

Files live in ``root`` (default data/omniglot). A missing file is downloaded from its canonical
URL, or from a mirror (``mirror=`` or $SCRATCHPROTO_MIRROR: an http(s):// or file:// URL, or a
folder laid out like the canonical files), to a temporary name; it is moved into place only
after it has been verified, so an interrupted download never leaves a file a later run trusts.

Integrity: an archive is verified by its content digest (sha256 over the packed pixels of every
image, in member-name order; it holds for re-packed archives too); a split file by its class
count. Decoding 32,460 PNGs takes seconds, so the preprocessed images are cached in
``cache28.npz`` (1 bit per pixel, ~13 MB), tagged with the settings and the archives' byte
hashes; the cache is rebuilt whenever either changes.
"""
import hashlib
import io
import json
import math
import os
import pathlib
import sys
import urllib.parse
import urllib.request
import zipfile

import numpy as np

from . import files
from .errors import UserError
from .files import fs_error

ARCHIVES = {
    "images_background": "0c9dd3e690771a96b7005791e921146797608178e3c6ee5ba6e82cc98a57121e",
    "images_evaluation": "9981879aa1d6238ebf877b6a048c375fec76cf8ab66b261d4edca5c50a8c9e32",
}
ARCHIVE_COUNTS = {"images_background": (964, 19280), "images_evaluation": (659, 13180)}
SPLITS = {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}
CANONICAL = {
    "images_background.zip": "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
    "images_evaluation.zip": "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
    **{f"splits/vinyals/{s}.txt": "https://raw.githubusercontent.com/jakesnell/prototypical-networks/"
                                  f"master/data/omniglot/splits/vinyals/{s}.txt" for s in SPLITS},
}
MIRROR_ENV = "SCRATCHPROTO_MIRROR"
SIZE = 28
ROTATIONS = (0, 90, 180, 270)
DRAWERS = 20
# Lake et al.'s one-shot benchmark trains on the background set only (lake.py). Its validation
# classes are held back from it as whole alphabets, since the benchmark tests on new alphabets:
# three unrelated scripts, every tenth alphabet in sorted order from the sixth, 105 of the 964
# background characters (10.9%).
BACKGROUND_VAL = ("Balinese", "Gujarati", "N_Ko")
CACHE_FORMAT = 1
CACHE_NAME = f"cache{SIZE}.npz"


class DataError(UserError):
    """A dataset file is missing, corrupt or not what it should be; the message says what to do."""


class _Invalid(Exception):
    """A reader's finding about a file, worded by the caller for the file's situation."""


# -- download ------------------------------------------------------------------------------

def source_url(relpath, mirror=None, canonical=None):
    """Where ``relpath`` (e.g. 'splits/vinyals/train.txt') comes from: the mirror, else its
    canonical URL (``canonical``, or CANONICAL's)."""
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if mirror is None:
        return canonical or CANONICAL[relpath]
    if urllib.parse.urlparse(mirror).scheme in ("http", "https", "file"):
        return mirror.rstrip("/") + "/" + relpath
    return pathlib.Path(mirror, relpath).resolve().as_uri()     # a plain folder


def download(url, dest, progress=True):
    """Stream ``url`` into ``dest`` (a temporary name the caller verifies and moves)."""
    from tqdm import tqdm

    def unreachable(e):
        return DataError(f"could not download {url}: {e}; check the network, or point --mirror "
                         f"(or ${MIRROR_ENV}) at a copy of the files")
    try:
        resp = urllib.request.urlopen(url, timeout=60)
    except (OSError, ValueError) as e:   # URLError, HTTPError, timeouts, bad URLs
        raise unreachable(e) from None
    try:
        with resp, open(dest, "wb") as out:
            total = resp.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                      desc=f"download {pathlib.Path(url).name}", disable=not progress,
                      leave=False) as bar:
                while True:
                    try:
                        chunk = resp.read(1 << 20)
                    except OSError as e:   # the connection broke
                        raise unreachable(e) from None
                    if not chunk:
                        break
                    out.write(chunk)       # an OSError here is the local disk's (full, read-only)
                    bar.update(len(chunk))
    except BaseException as e:   # a half file is never left behind, even on Ctrl-C
        pathlib.Path(dest).unlink(missing_ok=True)
        if isinstance(e, OSError):
            final = pathlib.Path(dest).with_suffix("")     # the name without its temporary suffix
            raise fs_error(e, final, "write", "choose a --data folder on a writable disk with "
                                              "space, or fix this one") from None
        raise


# -- verification and preprocessing ---------------------------------------------------------

def preprocess(img, rotations=ROTATIONS, size=SIZE):
    """A 105x105 mode-'1' PIL image -> (len(rotations), size, size) bool, strokes True, one per
    rotation (counter-clockwise degrees); size 28 is the paper's."""
    out = np.empty((len(rotations), size, size), dtype=bool)
    for r, angle in enumerate(rotations):
        # rotate() by a multiple of 90 degrees is an exact transpose; resize() of a 1-bit image
        # is nearest-neighbour. In the PNGs True is background, so invert.
        out[r] = ~np.asarray(img.rotate(angle).resize((size, size)), dtype=bool)
    return out


def check_size(size):
    """UserError unless ``size`` is an image side this project can use: a multiple of 4 (whole
    bytes per packed image, and the ConvNet's four poolings) from 16 to 104."""
    if isinstance(size, bool) or not isinstance(size, int) or size % 4 or not 16 <= size <= 104:
        raise UserError(f"--image-size must be a multiple of 4 from 16 to 104 (Omniglot's drawings are "
                        f"105x105), got {size}")
    return size


def read_archive(path, name, size=SIZE):
    """Decode, verify and preprocess one archive.

    Returns (characters ['Alphabet/characterNN', ...], bits uint8 (n_chars, 4, 20, 98)).
    Raises _Invalid when it is not a readable, genuine Omniglot archive.
    """
    from PIL import Image
    digest = hashlib.sha256()
    chars, images = [], []
    f = open(path, "rb")     # an OSError (permissions, a folder) is about the path, not the content
    try:
        with f, zipfile.ZipFile(f) as zf:
            members = sorted(m for m in zf.namelist() if m.endswith(".png"))
            for m in members:
                with Image.open(io.BytesIO(zf.read(m))) as img:
                    digest.update(np.packbits(np.asarray(img, dtype=bool)).tobytes())
                    char = "/".join(m.split("/")[1:3])
                    if not chars or chars[-1] != char:
                        chars.append(char)
                        images.append([])
                    images[-1].append(preprocess(img, size=size))
    except Exception as e:  # zipfile.BadZipFile, zlib/CRC errors, PIL decoding errors, ...
        raise _Invalid(f"is not a readable Omniglot archive ({type(e).__name__}: {e})") from None
    if digest.hexdigest() != ARCHIVES[name]:
        raise _Invalid(f"does not hold the official {name} images (content digest "
                       f"{digest.hexdigest()[:16]}..., expected {ARCHIVES[name][:16]}...)")
    if (len(chars), len(members)) != ARCHIVE_COUNTS[name] or any(len(i) != DRAWERS for i in images):
        raise _Invalid(f"has {len(chars)} characters and {len(members)} images, expected "
                       f"{ARCHIVE_COUNTS[name]}")
    # (chars, drawers, rotations, 28, 28) -> (chars, rotations, drawers, 98 bytes)
    arr = np.array(images).transpose(0, 2, 1, 3, 4).reshape(len(chars), len(ROTATIONS), DRAWERS, -1)
    return chars, np.packbits(arr, axis=-1)


def read_split(path, name):
    """The class names of a split file; _Invalid unless it holds the expected number."""
    try:
        lines = [ln.strip() for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise _Invalid(f"cannot be read as a split file ({e})") from None
    if len(lines) != SPLITS[name] or len(set(lines)) != len(lines):
        raise _Invalid(f"lists {len(set(lines))} distinct classes, expected {SPLITS[name]} "
                       f"(truncated or wrong)")
    return lines


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cache_meta(paths, size=SIZE):
    """What the cache depends on: the preprocessing settings and the archives' exact bytes (whose
    content digest was verified when the cache was built)."""
    return {"format": CACHE_FORMAT, "size": size, "rotations": list(ROTATIONS),
            "archives": {n: {"content": ARCHIVES[n], "bytes": _file_sha256(p)} for n, p in paths.items()}}


class Omniglot:
    """Omniglot on disk, verified, preprocessed and cached.

    Usage (the example of docs/engine.md, which tests/test_readme.py runs)::

        ds = Omniglot(root="data/omniglot", mirror=None)   # downloads / verifies / caches
        ds.classes("train")                      # ['Alphabet/characterNN/rotDDD', ...]
        ds.images("Angelic/character01/rot090")  # (20, 1, 28, 28) float32, strokes 1.0
    """

    def __init__(self, root="data/omniglot", mirror=None, progress=True, size=SIZE):
        self.root = pathlib.Path(root)
        self.mirror, self.progress, self.size = mirror, progress, check_size(size)
        files.ensure_folder(self.root, "Omniglot folder (--data)")
        self._splits = {name: self._fetch(f"splits/vinyals/{name}.txt", read_split, name)
                        for name in SPLITS}
        self._load_images()
        background = self.characters[:ARCHIVE_COUNTS["images_background"][0]]    # archive order
        for name, keep in (("background-train", False), ("background-val", True)):
            self._splits[name] = [f"{c}/rot{a:03d}" for c in background
                                  if (c.split("/")[0] in BACKGROUND_VAL) == keep for a in ROTATIONS]
        known = set(self._row)
        for name, lines in self._splits.items():
            unknown = [c for c in lines if c.rsplit("/", 1)[0] not in known
                       or c.rsplit("/", 1)[-1] not in {f"rot{a:03d}" for a in ROTATIONS}]
            if unknown:
                raise DataError(f"split file {self.root / 'splits/vinyals' / (name + '.txt')} names "
                                f"classes not in Omniglot (e.g. {unknown[0]!r}); delete it and re-run")

    def _fetch(self, relpath, reader, name):
        """Read a file, downloading and verifying it first when it is missing."""
        path = self.root / relpath
        if path.exists():
            try:
                return reader(path, name)
            except _Invalid as e:
                raise DataError(f"{path} {e}: delete it and re-run to download it again") from None
            except OSError as e:
                raise fs_error(e, path, "read") from None
        files.ensure_folder(path.parent, "Omniglot folder (--data)")
        tmp = files.temp_path(path)
        url = source_url(relpath, self.mirror)
        download(url, tmp, self.progress)
        try:
            result = reader(tmp, name)
        except BaseException as e:    # invalid, or interrupted while verifying: keep nothing
            tmp.unlink(missing_ok=True)
            if isinstance(e, _Invalid):
                raise DataError(f"the file downloaded from {url} {e}; it was not kept: check the "
                                f"mirror, or re-run to try again") from None
            raise
        os.replace(tmp, path)
        return result

    def _load_images(self):
        cache = self.root / f"cache{self.size}.npz"        # one per image size (CACHE_NAME: the paper's)
        paths = {name: self.root / f"{name}.zip" for name in ARCHIVES}
        if all(p.exists() for p in paths.values()) and cache.exists():
            try:
                with np.load(cache) as z:
                    if json.loads(str(z["meta"])) == _cache_meta(paths, self.size):
                        self._set(list(z["chars"]), z["bits"])
                        return
            except Exception:
                pass   # unreadable or stale cache: rebuild it below
        chars, bits = [], []
        for name in ARCHIVES:
            c, b = self._fetch(f"{name}.zip", lambda path, n: read_archive(path, n, self.size), name)
            chars += c
            bits.append(b)
        self._set(chars, np.concatenate(bits))
        meta = json.dumps(_cache_meta(paths, self.size))
        try:
            files.atomic_write(cache, lambda f: np.savez(f, meta=meta, chars=np.array(chars), bits=self.bits))
        except files.FileError as e:   # the images are in memory: go on, just without the cache
            print(f"warning: {e} (the cache only saves time: the next run decodes the images again)",
                  file=sys.stderr)

    def _set(self, chars, bits):
        self.characters = chars
        self.bits = bits                    # (n_chars, 4 rotations, 20 drawers, 98 bytes)
        self._row = {c: i for i, c in enumerate(chars)}

    # -- public API ------------------------------------------------------------------------
    def classes(self, split, rotations=True):
        """The classes of a split, 'Alphabet/characterNN/rotDDD': the Vinyals split's 'train', 'val',
        'test', 'trainval', or the background set's 'background-train', 'background-val' (all
        characters of images_background.zip at four rotations, BACKGROUND_VAL's alphabets held
        back for validation). ``rotations=False``: the unrotated characters only (rot000)."""
        if split not in self._splits:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(self._splits)}")
        return [c for c in self._splits[split] if rotations or c.endswith("/rot000")]

    def class_index(self, name):
        """(character row, rotation index) of a class name."""
        char, rot = name.rsplit("/", 1)
        try:
            return self._row[char], ROTATIONS.index(int(rot[3:]))
        except (KeyError, ValueError):
            raise UserError(f"unknown Omniglot class {name!r}") from None

    def images(self, name):
        """The 20 drawers' images of one class: (20, 1, size, size) float32, strokes 1.0, background 0.0."""
        row, rot = self.class_index(name)
        return unpack(self.bits[row, rot])


def unpack(bits):
    """Packed rows (..., size * size / 8) uint8 -> float32 images (..., 1, size, size): 98 bytes
    a row for the paper's 28x28 (a side that is a multiple of 4 packs into whole bytes)."""
    size = math.isqrt(8 * bits.shape[-1])
    px = np.unpackbits(bits, axis=-1, count=size * size)
    return px.reshape(*bits.shape[:-1], 1, size, size).astype(np.float32)
