"""The Omniglot data path: download, verification, preprocessing, cache, and the episode sampler."""
import importlib
import io
import shutil
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

import scratchproto as sp
from scratchproto import omniglot as og
from helpers import MIRROR, needs_mirror

pytestmark = needs_mirror


def test_download_over_http_counts_and_files(omniglot):
    ds = omniglot
    root = ds.root
    assert sorted(p.name for p in root.iterdir()) == ["cache28.npz", "images_background.zip",
                                                      "images_evaluation.zip", "splits"]
    assert not list(root.rglob("*.part*"))
    assert len(ds.characters) == 964 + 659
    assert ds.bits.shape == (1623, 4, 20, 98)           # 32,460 images x 4 rotations
    for split, count in {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}.items():
        assert len(ds.classes(split)) == count
    train, val, test = (set(ds.classes(s)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val == set(ds.classes("trainval"))


def test_every_split_class_has_twenty_images(omniglot):
    for split in ("train", "val", "test"):
        for c in omniglot.classes(split)[::97]:
            x = omniglot.images(c)
            assert x.shape == (20, 1, 28, 28) and x.dtype == np.float32
            assert set(np.unique(x)) <= {0.0, 1.0} and 0 < x.mean() < 0.5   # thin strokes


def test_preprocessing_against_independent_computation(omniglot):
    """Decode a few PNGs here, rotate with numpy, sample nearest neighbours by hand."""
    src = (np.arange(28) + 0.5) * 105 / 28
    idx = src.astype(int)          # the nearest source pixel of each output pixel's centre
    with zipfile.ZipFile(MIRROR / "images_evaluation.zip") as zf:
        for member, char, drawer in [("images_evaluation/Angelic/character01/0965_01.png", "Angelic/character01", 0),
                                     ("images_evaluation/Tengwar/character05/1535_13.png", "Tengwar/character05", 12)]:
            stroke = ~np.asarray(Image.open(io.BytesIO(zf.read(member))), dtype=bool)   # True = ink
            for k, rot in enumerate(["rot000", "rot090", "rot180", "rot270"]):
                expect = np.rot90(stroke, k)[idx][:, idx].astype(np.float32)       # counter-clockwise
                np.testing.assert_array_equal(omniglot.images(f"{char}/{rot}")[drawer, 0], expect)


def test_warm_start_uses_the_cache(omniglot, tmp_path):
    t = time.perf_counter()
    again = sp.Omniglot(root=omniglot.root, mirror="http://127.0.0.1:9/unreachable", progress=False)
    assert time.perf_counter() - t < 5     # no decoding (the README quotes the measured figure)
    np.testing.assert_array_equal(again.bits, omniglot.bits)


def test_file_url_mirror_and_plain_folder(tmp_path):
    """A file:// mirror for the splits, and the cache rebuilt when an archive's bytes change."""
    root = tmp_path / "root"
    ds = sp.Omniglot(root=root, mirror=MIRROR.as_uri(), progress=False)
    assert len(ds.classes("val")) == 688
    # a plain folder as mirror: fetch just a deleted split file again
    (root / "splits/vinyals/test.txt").unlink()
    assert len(sp.Omniglot(root=root, mirror=str(MIRROR), progress=False).classes("test")) == 1692


def _mirror_copy(tmp_path, **replace):
    """A writable copy of the mirror with some files replaced: {relpath with / as __: bytes}."""
    m = tmp_path / "mirror"
    shutil.copytree(MIRROR, m)
    for p in m.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    for key, data in replace.items():
        (m / key.replace("__", "/")).write_bytes(data)
    return m


def test_truncated_archive_is_rejected_and_not_kept(tmp_path):
    data = (MIRROR / "images_background.zip").read_bytes()
    mirror = _mirror_copy(tmp_path, **{"images_background.zip": data[:len(data) // 2]})
    root = tmp_path / "root"
    with pytest.raises(og.DataError, match=r"the file downloaded from .*images_background.zip is not a "
                                           r"readable Omniglot archive .*it was not kept"):
        sp.Omniglot(root=root, mirror=str(mirror), progress=False)
    assert not (root / "images_background.zip").exists()
    assert not list(root.rglob("*.part*"))


def test_corrupt_archive_in_place_says_delete_and_rerun(tmp_path):
    root = tmp_path / "root"
    (root / "splits").mkdir(parents=True)
    shutil.copytree(MIRROR / "splits", root / "splits", dirs_exist_ok=True)
    (root / "images_background.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(og.DataError, match=r"root/images_background.zip is not a readable Omniglot "
                                           r"archive .*: delete it and re-run"):
        sp.Omniglot(root=root, mirror=str(MIRROR), progress=False)


def _rewrite(src, dst, member, new_bytes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, new_bytes if info.filename == member else zin.read(info.filename))


def test_tampered_image_fails_the_content_digest(tmp_path):
    member = "images_evaluation/Angelic/character01/0965_01.png"
    with zipfile.ZipFile(MIRROR / "images_evaluation.zip") as zf:
        img = Image.open(io.BytesIO(zf.read(member)))
        img.load()
    px = np.asarray(img, dtype=bool).copy()
    px[50, 50] = ~px[50, 50]                             # one pixel
    buf = io.BytesIO()
    Image.fromarray(px).convert("1").save(buf, format="PNG")
    root = tmp_path / "root"
    shutil.copytree(MIRROR / "splits", root / "splits")
    shutil.copy(MIRROR / "images_background.zip", root)
    bad = root / "images_evaluation.zip"
    _rewrite(MIRROR / "images_evaluation.zip", bad, member, buf.getvalue())
    with pytest.raises(og.DataError, match=r"images_evaluation.zip does not hold the official "
                                           r"images_evaluation images .*: delete it and re-run"):
        sp.Omniglot(root=root, progress=False)
    assert not (root / "cache28.npz").exists()
    _rewrite(MIRROR / "images_evaluation.zip", bad, member, b"\x89PNG garbage")
    with pytest.raises(og.DataError, match=r"not a readable Omniglot archive \(UnidentifiedImageError"):
        sp.Omniglot(root=root, progress=False)


def test_split_file_missing_a_line_is_rejected(tmp_path):
    lines = (MIRROR / "splits/vinyals/val.txt").read_text().splitlines()
    mirror = _mirror_copy(tmp_path, **{"splits__vinyals__val.txt": "\n".join(lines[:-1]).encode()})
    root = tmp_path / "root"
    with pytest.raises(og.DataError, match=r"downloaded from .*val.txt lists 687 distinct classes, "
                                           r"expected 688 \(truncated or wrong\); it was not kept"):
        sp.Omniglot(root=root, mirror=str(mirror), progress=False)
    assert not (root / "splits/vinyals/val.txt").exists() and not list(root.rglob("*.part*"))
    (root / "splits/vinyals/val.txt").write_text("\n".join(lines[:-1]))   # a bad file already in place
    with pytest.raises(og.DataError, match=r"root/splits/vinyals/val.txt lists 687 .*: delete it and re-run"):
        sp.Omniglot(root=root, mirror=str(MIRROR), progress=False)


def test_split_file_with_unknown_class_or_bad_bytes(omniglot, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(omniglot.root, root)
    lines = (root / "splits/vinyals/test.txt").read_text().splitlines()
    (root / "splits/vinyals/test.txt").write_text("\n".join(lines[:-1] + ["Klingon/character01/rot000"]))
    with pytest.raises(og.DataError, match=r"test.txt names classes not in Omniglot \(e.g. "
                                           r"'Klingon/character01/rot000'\); delete it and re-run"):
        sp.Omniglot(root=root, progress=False)
    (root / "splits/vinyals/test.txt").write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(og.DataError, match=r"test.txt cannot be read as a split file .*delete it and re-run"):
        sp.Omniglot(root=root, progress=False)


def test_archive_with_the_right_pixels_but_wrong_layout(tmp_path, monkeypatch):
    """The digest covers the pixels, not how members group into characters: checked separately."""
    with zipfile.ZipFile(MIRROR / "images_background.zip") as zf:
        members = sorted(m for m in zf.namelist() if m.endswith(".png"))[:3]
        small = tmp_path / "images_background.zip"
        with zipfile.ZipFile(small, "w") as out:
            for m in members:
                out.writestr(m, zf.read(m))
    import hashlib
    digest = hashlib.sha256()
    with zipfile.ZipFile(small) as zf:
        for m in sorted(zf.namelist()):
            digest.update(np.packbits(np.asarray(Image.open(io.BytesIO(zf.read(m))), dtype=bool)).tobytes())
    monkeypatch.setitem(og.ARCHIVES, "images_background", digest.hexdigest())
    with pytest.raises(og._Invalid, match=r"has 1 characters and 3 images, expected \(964, 19280\)"):
        og.read_archive(small, "images_background")


def test_unreachable_mirror_gives_a_clear_error(tmp_path):
    with pytest.raises(og.DataError, match=r"could not download http://127.0.0.1:9/splits/vinyals/train.txt"):
        sp.Omniglot(root=tmp_path, mirror="http://127.0.0.1:9", progress=False)
    assert not list(tmp_path.rglob("*.part*"))


def test_unknown_split_and_class(omniglot):
    with pytest.raises(sp.UserError, match="unknown split .dev.; choose one of train, val, test, trainval, "
                                          "background-train, background-val"):
        omniglot.classes("dev")
    with pytest.raises(sp.UserError, match="unknown Omniglot class 'Nope/character01/rot000'"):
        omniglot.images("Nope/character01/rot000")


# -- the episode sampler --------------------------------------------------------------------

def test_draw_properties():
    from scratchproto.episodes import draw
    rng = np.random.default_rng(0)
    for _ in range(200):
        cls, drawers = draw(rng, 50, 20, 10)
        assert len(set(cls.tolist())) == 20 and cls.max() < 50
        assert drawers.shape == (20, 10)
        assert all(len(set(row.tolist())) == 10 for row in drawers) and drawers.max() < 20
    # every class and every drawer gets drawn: uniform, not a fixed subset
    seen_cls = np.concatenate([draw(rng, 50, 5, 2)[0] for _ in range(500)])
    seen_drawers = np.concatenate([draw(rng, 50, 5, 2)[1].ravel() for _ in range(500)])
    assert set(seen_cls.tolist()) == set(range(50)) and set(seen_drawers.tolist()) == set(range(20))


def test_episodes_shapes_content_and_determinism(omniglot):
    from scratchproto.episodes import draw
    eps = list(sp.episodes(omniglot, "val", way=7, shot=3, query=4, n=3, seed=5))
    assert len(eps) == 3
    xs, xq = eps[0]
    assert xs.shape == (7, 3, 1, 28, 28) and xq.shape == (7, 4, 1, 28, 28) and xs.dtype == np.float32
    # the images are exactly those of the drawn classes and drawers; support and query disjoint
    cls, drawers = draw(np.random.default_rng(5), 688, 7, 7)
    names = omniglot.classes("val")
    for i in range(7):
        imgs = omniglot.images(names[cls[i]])
        np.testing.assert_array_equal(xs[i], imgs[drawers[i, :3]])
        np.testing.assert_array_equal(xq[i], imgs[drawers[i, 3:]])
    again = list(sp.episodes(omniglot, "val", way=7, shot=3, query=4, n=3, seed=5))
    other = list(sp.episodes(omniglot, "val", way=7, shot=3, query=4, n=3, seed=6))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(eps, again))
    assert not np.array_equal(eps[0][0], other[0][0])


class _FixedDraws:
    """A stand-in generator for distort: random() says which parts are on, uniform() returns the
    top of each range."""

    def __init__(self, parts_on):
        self.parts_on = parts_on

    def random(self, shape):
        return np.where(np.isin(np.arange(shape[1]), self.parts_on), 0.0, 1.0) * np.ones(shape)

    def uniform(self, low, high, size):
        return np.full(size, high, dtype=float)


def test_distort_known_maps():
    from scratchproto.episodes import distort
    img = (np.random.default_rng(3).random((4, 1, 28, 28)) > 0.7).astype(np.float32)
    np.testing.assert_array_equal(distort(img, _FixedDraws([])), img)          # nothing on: identity
    # the shift alone, +0.53 pixel in rows and columns: every output pixel reads the input one
    # row down and one column right (nearest neighbour); the last row and column read outside
    moved = distort(img, _FixedDraws([3]))
    np.testing.assert_array_equal(moved[..., :-1, :-1], img[..., 1:, 1:])
    assert not moved[..., -1, :].any() and not moved[..., :, -1].any()
    # scale 1.2 alone: a zoom out about the centre; the centre pixel stays where it is
    centre = np.zeros((1, 1, 28, 28), np.float32)
    centre[..., 13:15, 13:15] = 1
    assert distort(centre, _FixedDraws([2]))[..., 13:15, 13:15].all()


def test_distort_random_maps_stay_binary_and_differ():
    from scratchproto.episodes import distort
    img = (np.random.default_rng(4).random((200, 1, 28, 28)) > 0.7).astype(np.float32)
    out = distort(img, np.random.default_rng(5))
    assert out.shape == img.shape and out.dtype == img.dtype and set(np.unique(out)) <= {0.0, 1.0}
    changed = (out != img).any(axis=(1, 2, 3))
    # 1/16 of the maps have no part on, and a map of a shift alone (1/16) moves no pixel unless
    # the shift passes half a pixel (6% of them): about 12% leave the image as it is, not many more
    assert 0.8 < changed.mean() < 1
    np.testing.assert_array_equal(distort(img, np.random.default_rng(5)), out)   # seeded


def test_augmented_episodes_draw_the_same_classes_and_drawers(omniglot, monkeypatch):
    ep = importlib.import_module("scratchproto.episodes")     # (the package exports the function)
    plain = list(sp.episodes(omniglot, "val", way=5, shot=2, query=3, n=2, seed=7))
    augmented = list(sp.episodes(omniglot, "val", way=5, shot=2, query=3, n=2, seed=7, augment=True))
    assert not np.array_equal(plain[0][0], augmented[0][0])
    monkeypatch.setattr(ep, "distort", lambda x, rng: x)       # undo the distortion: the same draws
    undone = list(sp.episodes(omniglot, "val", way=5, shot=2, query=3, n=2, seed=7, augment=True))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(plain, undone))


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="val", way=689), "way = 689 exceeds the 688 classes of split 'val'"),
    (dict(split="train", shot=15, query=6), "shot \\+ query = 21 exceeds the 20 drawers"),
    (dict(split="train", shot=0), "shot must be a positive integer, got 0"),
    (dict(split="train", query=-1), "query must be a positive integer, got -1"),
    (dict(split="train", way=1), "way must be at least 2"),
    (dict(split="train", n=0), "number of episodes must be a positive integer, got 0"),
    (dict(split="nope"), "unknown split 'nope'"),
])
def test_impossible_episodes_fail_at_once(omniglot, kwargs, message):
    with pytest.raises(sp.UserError, match=message):
        next(sp.episodes(omniglot, **kwargs))


def test_another_image_size_has_its_own_cache_and_images(omniglot, tmp_path):
    """--image-size: the same drawings resized to 32x32, cached beside the 28x28 ones, whose
    cache is left as it was; the images agree with preprocessing one drawing by hand."""
    root = tmp_path / "omniglot"
    shutil.copytree(omniglot.root, root)
    before = (root / "cache28.npz").read_bytes()
    big = sp.Omniglot(root=root, mirror="http://127.0.0.1:9/offline", progress=False, size=32)
    name = big.classes("test")[0]
    images = big.images(name)
    assert images.shape == (20, 1, 32, 32) and set(np.unique(images)) <= {0.0, 1.0}
    assert (root / "cache32.npz").exists() and (root / "cache28.npz").read_bytes() == before
    assert omniglot.images(name).shape == (20, 1, 28, 28)
    again = sp.Omniglot(root=root, mirror="http://127.0.0.1:9/offline", progress=False, size=32)
    assert np.array_equal(again.images(name), images)                     # from its cache
    idx = ((np.arange(32) + 0.5) * 105 / 32).astype(int)                 # nearest neighbours, by hand
    with zipfile.ZipFile(MIRROR / "images_evaluation.zip") as zf:
        stroke = ~np.asarray(Image.open(io.BytesIO(zf.read("images_evaluation/Angelic/character01/0965_01.png"))),
                             dtype=bool)
    np.testing.assert_array_equal(big.images("Angelic/character01/rot090")[0, 0],
                                  np.rot90(stroke, 1)[idx][:, idx].astype(np.float32))
    for size in (30, 12, 108, 28.0):
        with pytest.raises(sp.UserError, match="--image-size must be a multiple of 4 from 16 to 104"):
            sp.Omniglot(root=root, progress=False, size=size)
