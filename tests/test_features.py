"""Batched feature extraction into the cache: per-file failures, parity with one-at-a-time
encoding, resuming, concurrent writers, and the extraction command end to end (CPU, tiny ImageBind)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

import toollmm.features as features_module
from toollmm.cli import extract_features as command
from toollmm.data.toolmmbench import DataReport, MediaRef, Record
from toollmm.features import FeatureCache, FrozenEncoder, _batches_by_modality, extract_features, featurize

from conftest import DATA, TINY_CONFIG, TINY_IMAGEBIND, gpu, run_entry

ASSETS = DATA / "assets"
IMAGES = [ASSETS / "bird_image.jpg", *sorted((DATA / "t2x_pairs" / "cc3m" / "images").glob("*.jpg"))[:2]]
AUDIOS = [ASSETS / "bird_audio.wav", ASSETS / "test.wav"]
VIDEOS = [ASSETS / "test.mp4", sorted((DATA / "t2x_pairs" / "webvid" / "videos").glob("*.mp4"))[0]]
GOOD = [MediaRef("image", p) for p in IMAGES] + [MediaRef("audio", p) for p in AUDIOS] + [MediaRef("video", p) for p in VIDEOS]


def cache_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def encoder(tiny_default):
    return FrozenEncoder(TINY_IMAGEBIND, "tiny")


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> dict[str, MediaRef]:
    folder = tmp_path_factory.mktemp("corrupt")
    jpeg, video = IMAGES[0].read_bytes(), VIDEOS[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.mp4").write_bytes(video[: len(video) // 3])  # cut before the moov atom
    return {
        "image": MediaRef("image", folder / "truncated.jpg"),
        "audio": MediaRef("audio", folder / "empty.wav"),
        "video": MediaRef("video", folder / "corrupt.mp4"),
    }


@pytest.fixture(scope="module")
def extracted(encoder, corrupt, tmp_path_factory):
    """Every good file plus one broken file per modality, two decoding processes. Batches of 4 hold
    each modality's files (at most 3 good + 1 broken) whatever the folders' sort order."""
    cache = FeatureCache(tmp_path_factory.mktemp("cache"), encoder.identity)
    refs = GOOD + list(corrupt.values())
    return cache, extract_features(refs, encoder, cache, batch_size=4, num_workers=2, progress=False)


def test_broken_files_get_a_message_naming_them_and_their_batch_proceeds(extracted, corrupt):
    cache, result = extracted
    # The scenario holds: each broken file shares its batch with good files (extract_features's order).
    ordered = sorted(GOOD + list(corrupt.values()), key=lambda r: (r.modality, str(r.path)))
    batches = [[ordered[i] for i in batch] for batch in _batches_by_modality(ordered, 4)]
    for ref in corrupt.values():
        [batch] = [b for b in batches if ref in b]
        assert any(r in GOOD for r in batch)
    assert set(result.failed) == set(corrupt.values())
    reasons = {"image": "not a readable image", "audio": "not a readable audio file", "video": "not a readable video"}
    for modality, ref in corrupt.items():
        message = result.failed[ref]
        assert message.startswith(str(ref.path)) and reasons[modality] in message, message
    assert sorted(result.extracted, key=str) == sorted(GOOD, key=str) and result.cached == []
    assert len(cache_files(cache.root)) == len(GOOD) and not temp_files(cache.root)
    for ref in GOOD:
        stored = load_file(cache.path(ref))["feature"]
        assert stored.dtype == torch.float32 and stored.shape == (1024,)
        assert torch.equal(stored, result.features[ref])


def test_batched_features_equal_one_at_a_time_encoding(extracted, encoder):
    _, result = extracted
    for ref in GOOD:
        torch.testing.assert_close(result.features[ref], encoder.encode(ref), atol=1e-5, rtol=0, msg=str(ref))


def test_featurize_loads_cached_features_and_drops_records_with_broken_media(extracted, encoder, corrupt, monkeypatch):
    cache, result = extracted
    # Everything decodable is cached: featurize must not run the encoder at all.
    monkeypatch.setattr(encoder, "encode_batch_async", lambda *a: pytest.fail("encoder ran although every feature was cached"))
    records = [Record(f"r{i}", "q", media=[ref], tools=["tool"], input_modality=ref.modality) for i, ref in enumerate(GOOD + [corrupt["audio"]])]
    report = DataReport(rows=len(records), used=len(records))
    kept, features = featurize(records, encoder, FeatureCache(cache.root.parent, encoder.identity), report, num_workers=0)
    assert [r.id for r in kept] == [f"r{i}" for i in range(len(GOOD))]
    assert report.used == len(GOOD) and report.skipped == {"undecodable media": 1}
    assert "empty.wav" in report.examples["undecodable media"][0]
    assert all(torch.equal(features[ref], result.features[ref]) for ref in GOOD)


def test_the_encoder_loads_its_checkpoint_only_for_features_the_cache_misses(extracted):
    """A run whose media features are all cached, or that has no media, never reads ImageBind's
    weights (4.5 GB for the huge checkpoint); the first cache miss loads them."""
    cache, result = extracted
    encoder = FrozenEncoder(TINY_IMAGEBIND, "tiny")
    assert not encoder.loaded and encoder.out_dim == 1024
    records = [Record(f"r{i}", "q", media=[ref], tools=["tool"], input_modality=ref.modality) for i, ref in enumerate(GOOD)]
    records.append(Record("text", "q", media=[], tools=["tool"], input_modality="text"))
    kept, features = featurize(records, encoder, FeatureCache(cache.root.parent, encoder.identity),
                               DataReport(rows=len(records), used=len(records)), num_workers=0)
    assert len(kept) == len(records) and all(torch.equal(features[ref], result.features[ref]) for ref in GOOD)
    assert not encoder.loaded
    extract_features([GOOD[0]], encoder, FeatureCache(cache.root.parent / "cold", encoder.identity), num_workers=0, progress=False)
    assert encoder.loaded
    # A wrong path still fails at once, naming the file.
    with pytest.raises(ValueError, match=r"ImageBind checkpoint /nowhere/ib.pth does not exist"):
        FrozenEncoder(Path("/nowhere/ib.pth"), "tiny")


def test_interrupted_run_resumes_with_only_the_missing_files(encoder, tmp_path, monkeypatch):
    refs = [MediaRef("audio", p) for p in AUDIOS] + [MediaRef("image", p) for p in IMAGES]  # batches: 2 audio | 2 images | 1 image
    cache = FeatureCache(tmp_path, encoder.identity)
    real = encoder.encode_batch_async
    encoded: list[int] = []

    def dies_after_first_batch(branch, inputs):
        if encoded:
            raise RuntimeError("killed")
        encoded.append(len(inputs))
        return real(branch, inputs)

    monkeypatch.setattr(encoder, "encode_batch_async", dies_after_first_batch)
    with pytest.raises(RuntimeError, match="killed"):
        extract_features(refs, encoder, cache, batch_size=2, num_workers=0, progress=False)
    assert [p.parent.name for p in cache_files(cache.root)] == ["audio", "audio"] and not temp_files(tmp_path)

    def counting(branch, inputs):
        encoded.append(len(inputs))
        return real(branch, inputs)

    hashed: list[Path] = []

    def counting_digest(path, *args, **kwargs):
        hashed.append(Path(path))
        return real_digest(path, *args, **kwargs)

    real_digest = features_module._file_digest
    encoded.clear()
    monkeypatch.setattr(encoder, "encode_batch_async", counting)
    monkeypatch.setattr(features_module, "_file_digest", counting_digest)
    rerun = FeatureCache(tmp_path, encoder.identity)  # a new run: nothing remembered but the files
    result = extract_features(refs + refs[:1], encoder, rerun, batch_size=2, num_workers=0, progress=False)
    assert encoded == [2, 1]  # the three images only
    assert sorted(hashed) == sorted(r.path for r in refs)  # each file read for its hash once, lookup and write included
    assert set(result.cached) == set(refs[:2]) and set(result.extracted) == set(refs[2:])
    assert len(cache_files(tmp_path)) == 5


def test_a_write_killed_midway_leaves_the_previous_file_whole_and_no_temp_file(encoder, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, encoder.identity)
    ref = MediaRef("image", IMAGES[0])
    cache.store(ref, torch.ones(1024))

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(features_module, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        cache.store(ref, torch.zeros(1024))
    assert torch.equal(load_file(cache.path(ref))["feature"], torch.ones(1024))
    assert cache_files(tmp_path) == [cache.path(ref)] and not temp_files(tmp_path)


WRITER = """
import sys, time
from pathlib import Path
from toollmm.data.toolmmbench import MediaRef
from toollmm.features import FeatureCache, FrozenEncoder, extract_features
root, name, paths = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
encoder = FrozenEncoder(Path({imagebind!r}), "tiny")
cache = FeatureCache(root, encoder.identity)
refs = [MediaRef(p.split(":", 1)[0], Path(p.split(":", 1)[1])) for p in paths]
(root / f"{{name}}.ready").touch()
while not (root / "go").exists():
    time.sleep(0.01)
result = extract_features(refs, encoder, cache, batch_size=1, num_workers=0, progress=False)
for _ in range(20):  # then keep replacing the same files while the other process does too
    for ref, feature in result.features.items():
        cache.store(ref, feature)
print(len(result.cached), len(result.extracted))
"""


def test_two_processes_extracting_into_one_cache_leave_only_whole_files(encoder, tmp_path):
    refs = [f"{r.modality}:{r.path}" for r in GOOD if r.modality != "video"]
    script = WRITER.format(imagebind=str(TINY_IMAGEBIND))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name, *refs], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{n}.ready").exists() for n in "ab"):  # both loaded: start them together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    # A third party reading the cache meanwhile (training on another node) never sees a partial file.
    # It reads each file in one go, as FeatureCache.load does: safetensors' load_file opens the path
    # twice (header, then mmap), so a replace between the two opens tears the read, not the file.
    reads = 0
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        for path in cache_files(tmp_path):
            assert load_tensors(path.read_bytes())["feature"].shape == (1024,)
            reads += 1
    outputs = [p.communicate(timeout=120) for p in procs]
    assert reads > 0
    assert [p.returncode for p in procs] == [0, 0], outputs
    for out, _ in outputs:
        cached, fresh = map(int, out.split())
        assert cached + fresh == len(refs)
    files = cache_files(tmp_path)
    assert len(files) == len(refs) and not temp_files(tmp_path)
    reference = FeatureCache(tmp_path, encoder.identity)
    for ref in (r for r in GOOD if r.modality != "video"):
        torch.testing.assert_close(load_file(reference.path(ref))["feature"], encoder.encode(ref), atol=1e-5, rtol=0)


def _row(index: int, modality: str, path: str, query: str = "What tool handles this?") -> dict:
    row = {"id": index, "image_path": "", "audio_path": "", "video_path": "", "input_modality": modality,
           "conversations": [{"from": "human", "value": query}, {"from": "gpt", "value": "some/tool"}]}
    if modality != "text":
        row[f"{modality}_path"] = path
    return row


def test_command_reports_found_cached_extracted_missing_and_corrupt(tiny_default, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(IMAGES[0], media / "bird.jpg")
    shutil.copy(AUDIOS[0], media / "bird.wav")
    (media / "empty.wav").write_bytes(b"")
    rows = [
        _row(1, "image", "bird.jpg"),
        _row(2, "image", "bird.jpg", "Another question on the same image"),  # one file, named twice
        _row(3, "audio", "bird.wav"),
        _row(4, "image", "gone.jpg"),
        _row(5, "audio", "empty.wav"),
        _row(6, "text", ""),
    ]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    args = ["--config", str(TINY_CONFIG), "--data", str(data), "--media-root", str(media), "--num-workers", "0",
            "--quiet", f"data.feature_cache_dir={tmp_path / 'cache'}"]

    first = json.loads(run_entry("extract_features.py", *args).stdout)  # as a user runs it: stdout is the JSON report
    counts = ("files", "found", "missing", "cached_before", "extracted", "corrupt")
    assert {k: first[k] for k in counts} == dict(zip(counts, (4, 3, 1, 0, 2, 1)))
    assert first["by_modality"]["image"] == dict(zip(counts, (2, 1, 1, 0, 1, 0)))
    assert first["examples"]["missing"] == [str(media / "gone.jpg")]
    [message] = first["examples"]["corrupt"]
    assert message.startswith(str(media / "empty.wav")) and "not a readable audio file" in message
    assert json.loads((Path(first["cache_dir"]) / "extract_report.json").read_text()) == first
    assert len(cache_files(Path(first["cache_dir"]))) == 2

    again = command.main(args + ["--report", str(tmp_path / "again.json")])
    assert {k: again[k] for k in counts} == dict(zip(counts, (4, 3, 1, 2, 0, 1)))
    assert json.loads((tmp_path / "again.json").read_text()) == again


@pytest.mark.parametrize(("extra", "expected"), [
    (["--data", "/nowhere/rows.json"], "--data /nowhere/rows.json does not exist"),
    (["data.no_such_key=1"], "unknown config key data.no_such_key"),
    (["model.imagebind_path=/nowhere/imagebind.pth"], "model.imagebind_path: /nowhere/imagebind.pth does not exist"),
])
def test_command_config_errors_exit_nonzero_naming_the_problem(tiny_default, extra, expected):
    with pytest.raises(SystemExit) as exit_:
        command.main(["--config", str(TINY_CONFIG), *extra])
    assert expected in str(exit_.value.code)


@pytest.mark.gpu
@gpu
def test_half_precision_extraction_on_cuda_agrees_with_fp32(tiny_default, tmp_path):
    fp32 = FrozenEncoder(TINY_IMAGEBIND, "tiny", "cuda")
    reference = extract_features(GOOD, fp32, FeatureCache(tmp_path / "fp32", fp32.identity), batch_size=4, num_workers=2,
                                 progress=False)
    cpu = FrozenEncoder(TINY_IMAGEBIND, "tiny")
    for ref in GOOD:  # conv stems run in TF32 on CUDA by default: close, not equal
        assert F.cosine_similarity(reference.features[ref], cpu.encode(ref), dim=0) > 0.9999, ref
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        encoder = FrozenEncoder(TINY_IMAGEBIND, "tiny", "cuda", dtype)
        cache = FeatureCache(tmp_path / name, encoder.identity)
        result = extract_features(GOOD, encoder, cache, batch_size=4, num_workers=2, progress=False)
        cosines, diffs = [], []
        for ref in GOOD:
            feature, exact = result.features[ref], reference.features[ref]
            assert feature.dtype == torch.float32
            with safe_open(cache.path(ref), "pt") as f:
                assert f.metadata()["dtype"] == name
            cosines.append(F.cosine_similarity(feature, exact, dim=0).item())
            diffs.append((feature - exact).abs().max().item())
        print(f"{name} vs fp32 on {torch.cuda.get_device_name()}: min cosine {min(cosines):.6f}, max abs diff {max(diffs):.2e}")
        assert min(cosines) > 0.99
