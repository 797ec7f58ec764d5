"""The streaming loader: 2 ranks x 2 workers over uneven shards, exact and resampled modes, bad samples, specs."""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from sana_sr.data import DegradationConfig, make_loader
from sana_sr.data.streaming import LoaderConfig

PHOTOS = Path(__file__).resolve().parents[1] / "sana_sr" / "assets" / "photos"
SHARD_SIZES = [10, 7, 13, 4, 9]  # uneven on purpose: 43 samples
CROP = 32


def photo_crops(n: int, seed: int, size: int = 48) -> list[bytes]:
    """n JPEG-encoded crops of the bundled real photos."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(PHOTOS.iterdir())]
    out = []
    for i in range(n):
        a = arrays[i % len(arrays)]
        top, left = rng.integers(0, a.shape[0] - size), rng.integers(0, a.shape[1] - size)
        buffer = io.BytesIO()
        Image.fromarray(a[top : top + size, left : left + size]).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_set(folder: Path, sizes: list[int], seed: int = 0) -> list[str]:
    """Shards s-00.tar ... with a jpg and a txt per sample, plus sizes.json; returns every key."""
    folder.mkdir(parents=True, exist_ok=True)
    images = iter(photo_crops(sum(sizes), seed))
    keys = []
    for s, n in enumerate(sizes):
        members = []
        for i in range(n):
            key = f"s{s}_{i:03d}"
            keys.append(key)
            members += [(f"{key}.jpg", next(images)), (f"{key}.txt", f"caption of {key}".encode())]
        write_tar(folder / f"s-{s:02d}.tar", members)
    (folder / "sizes.json").write_text(json.dumps({f"s-{s:02d}.tar": n for s, n in enumerate(sizes)}))
    return keys


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("uneven")
    return folder, write_set(folder, SHARD_SIZES)


def fake_rank(monkeypatch, rank: int, world: int = 2) -> None:
    # The environment webdataset and torchrun use; the loader reads the same variables.
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def run_ranks(monkeypatch, spec, epochs=(0,), **config) -> dict[int, list[list[dict]]]:
    """{rank: [batches of each epoch]} for 2 ranks faked through the environment, 2 workers each (no kernels)."""
    result = {}
    for rank in range(2):
        fake_rank(monkeypatch, rank)
        loader = make_loader(spec, LoaderConfig(num_workers=2, crop_size=CROP, **config), degradation=None)
        result[rank] = []
        for epoch in epochs:
            loader.set_epoch(epoch)
            result[rank].append(list(loader))
    return result


@pytest.mark.slow
def test_resampled_gives_every_rank_the_same_number_of_full_batches(monkeypatch, uneven):
    folder, _ = uneven
    runs = run_ranks(monkeypatch, folder, epochs=(0, 1), batch_size=4, shuffle_buffer=10)
    expected = math.ceil(43 / (4 * 2))
    for rank, epochs in runs.items():
        for batches in epochs:
            assert len(batches) == expected, rank
            assert all(len(b["key"]) == 4 and b["hq"].shape == (4, 3, CROP, CROP) for b in batches)
    keys = {rank: [k for b in epochs[0] for k in b["key"]] for rank, epochs in runs.items()}
    assert keys[0] != keys[1]  # each rank draws its own stream
    assert [k for b in runs[0][0] for k in b["key"]] != [k for b in runs[0][1] for k in b["key"]]  # epochs differ


def test_exact_mode_reads_each_sample_once_with_equal_batch_counts(monkeypatch, uneven):
    folder, keys = uneven
    runs = run_ranks(monkeypatch, folder, epochs=(0, 1), batch_size=4, mode="exact", shuffle_buffer=10)
    for epoch in range(2):
        counts = [len(runs[rank][epoch]) for rank in range(2)]
        assert counts[0] == counts[1], counts  # short ranks are padded with empty batches
        seen = Counter(k for rank in range(2) for b in runs[rank][epoch] for k in b["key"])
        assert sorted(seen) == sorted(keys)
        assert set(seen.values()) == {1}
    assert runs[0][0][-1]["hq"].shape[1:] == (3, CROP, CROP)


@pytest.mark.slow
def test_resampled_sample_frequencies_are_uniform(monkeypatch, uneven):
    """Chi-square at the 0.001 level. Shards are drawn uniformly and read whole, so every sample of a shard has the
    same count: the test is on the per-shard count (samples seen / shard size), S - 1 = 4 degrees of freedom."""
    folder, keys = uneven
    runs = run_ranks(monkeypatch, folder, epochs=(0, 1), batch_size=4, shuffle_buffer=8, epoch_samples=3000)
    seen = Counter(k for rank in runs for epoch in runs[rank] for b in epoch for k in b["key"])
    assert set(seen) == set(keys)
    shard_counts = []
    for s, n in enumerate(SHARD_SIZES):
        counts = [seen[f"s{s}_{i:03d}"] for i in range(n)]
        # Within a shard, counts differ only by the shards cut at the 8 epoch ends (2 epochs x 2 ranks x 2 workers).
        assert max(counts) - min(counts) <= 8, counts
        shard_counts.append(sum(counts) / n)
    observed = np.array(shard_counts)
    expected = np.full(len(SHARD_SIZES), observed.sum() / len(SHARD_SIZES))
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(stats.chi2.sf(chi2, df=len(SHARD_SIZES) - 1))
    assert p_value > 0.001, (chi2, p_value, shard_counts)
    per_sample = np.array([seen[k] for k in keys])
    assert per_sample.min() > 0.6 * per_sample.mean()


def test_bad_samples_are_skipped_and_counted(monkeypatch, tmp_path):
    crops = iter(photo_crops(25, seed=1))
    good = []

    def sample(key, data=None):
        good.append(key)
        return [(f"{key}.jpg", data or next(crops)), (f"{key}.txt", key.encode())]

    corrupt = bytearray(next(crops))
    corrupt[2:200] = bytes(range(198))  # header tables overwritten: Pillow cannot identify it
    first = [m for i in range(6) for m in sample(f"a{i}")]
    first += [("bad_jpeg.jpg", bytes(corrupt)), ("bad_jpeg.txt", b"x"), ("empty.jpg", b""), ("empty.txt", b"x")]
    write_tar(tmp_path / "s-00.tar", first)
    # A tar cut in the middle of its third image: two samples survive; the other three (sizes.json says five) are
    # counted.
    write_tar(tmp_path / "whole.tar", [m for i in range(5) for m in sample(f"b{i}")])
    del good[-3:]
    raw = (tmp_path / "whole.tar").read_bytes()
    third = raw.index(b"b2.jpg")
    (tmp_path / "s-01.tar").write_bytes(raw[: third + 512 + 300])  # header block + 300 bytes of its data
    (tmp_path / "whole.tar").unlink()
    for s in (2, 3):
        write_tar(tmp_path / f"s-{s:02d}.tar", [m for i in range(5) for m in sample(f"c{s}{i}")])
    (tmp_path / "sizes.json").write_text(json.dumps({"s-00.tar": 8, "s-01.tar": 5, "s-02.tar": 5, "s-03.tar": 5}))

    runs = run_ranks(monkeypatch, tmp_path, batch_size=3, mode="exact", shuffle_buffer=0)
    seen = [k for rank in runs for b in runs[rank][0] for k in b["key"]]
    assert sorted(seen) == sorted(good)
    assert sum(b["skipped"] for rank in runs for b in runs[rank][0]) == 2 + 3
    assert len(runs[0][0]) == len(runs[1][0])

    # Resampled: the loader goes on through the bad shards for its whole epoch, and keeps the running total.
    fake_rank(monkeypatch, 0, 1)
    loader = make_loader(tmp_path, LoaderConfig(num_workers=2, crop_size=CROP, batch_size=3, epoch_samples=60))
    batches = list(loader)
    assert len(batches) == 20
    assert loader.skipped == sum(b["skipped"] for b in batches) > 0


def test_bad_sample_warnings_are_rate_limited(monkeypatch, tmp_path, caplog):
    crops = photo_crops(4, seed=2)
    members = []
    for i in range(40):
        members += [(f"bad{i}.jpg", b"not a jpeg")] + ([(f"ok{i}.jpg", crops[i % 4])] if i % 4 == 0 else [])
    write_tar(tmp_path / "s.tar", members)
    fake_rank(monkeypatch, 0, 1)
    loader = make_loader(str(tmp_path / "s.tar"), LoaderConfig(num_workers=0, crop_size=CROP, batch_size=2,
                         mode="exact", warn_first=2, warn_interval_s=3600, shuffle_buffer=0))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sana_sr.data"):
        batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 40
    assert len([r for r in caplog.records if "skipped bad sample" in r.getMessage()]) == 2


def test_too_few_shards_for_the_readers_is_a_clear_error(monkeypatch, tmp_path):
    write_set(tmp_path, [3, 3, 3])
    fake_rank(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"3 shards in .* too few for 2 ranks x 2 workers = 4 readers"):
        make_loader(tmp_path, LoaderConfig(num_workers=2, crop_size=CROP))


def test_shard_specs_brace_pipe_and_errors(monkeypatch, uneven):
    folder, keys = uneven
    fake_rank(monkeypatch, 0, 1)
    pattern = str(folder / "s-{00..04}.tar")
    common = dict(num_workers=2, crop_size=CROP, batch_size=4, mode="exact", shuffle_buffer=0)
    for spec, extra in ((pattern, {}), (f"pipe:cat {pattern}", {}), ([pattern], {}), (str(folder / "sizes.json"), {})):
        loader = make_loader(spec, LoaderConfig(**common, **extra))
        assert sorted(k for b in loader for k in b["key"]) == sorted(keys), spec
    with pytest.raises(ValueError, match="set LoaderConfig.epoch_samples"):
        make_loader(f"pipe:cat {pattern}", LoaderConfig(num_workers=2, crop_size=CROP))
    assert len(make_loader(f"pipe:cat {pattern}", LoaderConfig(num_workers=2, epoch_samples=40))) == 3
    with pytest.raises(FileNotFoundError, match=r"1 of 6 shards .* do not exist, e.g. .*s-05.tar"):
        make_loader(str(folder / "s-{00..05}.tar"), LoaderConfig(num_workers=2))
    with pytest.raises(FileNotFoundError, match="shard spec not found: .*nowhere"):
        make_loader(folder / "nowhere", LoaderConfig(num_workers=2))
    (folder / "plain").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no sizes.json in .*plain"):
        make_loader(folder / "plain", LoaderConfig(num_workers=2))


def test_batches_content_and_seeded_reproducibility(monkeypatch, uneven):
    folder, _ = uneven
    fake_rank(monkeypatch, 1)
    config = LoaderConfig(num_workers=2, crop_size=CROP, batch_size=4, seed=5, shuffle_buffer=10)

    def epoch(e):
        loader = make_loader(folder, config)  # kernels drawn with the x4plus values by default
        loader.set_epoch(e)
        return list(loader)

    a, b, c = epoch(3), epoch(3), epoch(4)
    batch = a[0]
    assert batch["hq"].dtype == torch.float32 and 0 <= float(batch["hq"].min()) and float(batch["hq"].max()) <= 1
    assert batch["caption"] == [f"caption of {k}" for k in batch["key"]]
    for name in ("kernel1", "kernel2", "sinc_kernel"):
        assert batch[name].shape == (4, 21, 21)
        assert torch.allclose(batch[name].sum((1, 2)), torch.ones(4), atol=1e-5)
    assert isinstance(batch["skipped"], int)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert torch.equal(x["hq"], y["hq"]) and torch.equal(x["kernel1"], y["kernel1"])
    assert [x["key"] for x in a] != [x["key"] for x in c]
    # Each worker draws its own kernels: no two samples of an epoch share a kernel1.
    kernels = torch.cat([x["kernel1"] for x in a]).flatten(1)
    assert len({tuple(k.tolist()) for k in kernels}) == len(kernels)
    # The draws take their values from the DegradationConfig given; None draws none.
    small = next(iter(make_loader(folder, config, degradation=DegradationConfig(blur_kernel_size=15))))
    assert small["kernel1"].shape == (4, 15, 15)
    assert "kernel1" not in next(iter(make_loader(folder, config, degradation=None)))


def test_small_images_are_skipped_and_counted(monkeypatch, uneven):
    folder, _ = uneven
    fake_rank(monkeypatch, 0, 1)
    loader = make_loader(folder, LoaderConfig(num_workers=2, crop_size=64, batch_size=4, mode="exact"))
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 43 and not any(b["key"] for b in batches)
