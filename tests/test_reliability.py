"""Training survives kills, corrupt states, bad data and non-finite losses without losing work;
data files cannot point outside their media folder; every shipped config validates.

Covered: the kill (SIGKILL to the training process and everything it started) and the corrupt
resume state, 104+ bad inputs, two numerical faults."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, DATA, TINY_CONFIG, run_entry
from toollmm.checkpoint import load_checkpoint
from toollmm.config import CONFIG_DIR, ConfigError, load_config
from toollmm.data.captions import read_caption_file
from toollmm.data.toolmmbench import OUTSIDE_ROOT, read_toolmmbench

CHAIN_CONFIG = CONFIG_DIR / "tiny_chain.yaml"
RUN = ["train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.max_steps=14",
       "train.save_every_steps=2", "train.keep_last=3", "train.log_every_steps=1",
       "model.tuning=lora", "train.learning_rate=0.001"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def train_command(out: Path, *extra: str) -> list[str]:
    return ["bash", str(ROOT / "scripts" / "train.sh"), "--stage", "3", "--config", str(TINY_CONFIG),
            f"train.output_dir={out}", *RUN, *extra]


# --------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def uninterrupted(tiny_default, tmp_path_factory):
    run = tmp_path_factory.mktemp("reliability") / "uninterrupted"
    run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}", *RUN)
    return run


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Every step once, and the same losses, learning rates, samples and final weights (exact on CPU)."""
    a, b = metrics(reference), metrics(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 15))
    for before, after in zip(a, b):
        assert (after["loss"], after["lr"], after["samples_seen"]) == (before["loss"], before["lr"], before["samples_seen"]), after["step"]
    x, y = load_file(reference / "final" / "trainable.safetensors"), load_file(resumed / "final" / "trainable.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "1"}
    # With the held-out measurement on (not in the uninterrupted run): it draws no randomness, and
    # its before-training figures reach held_out.json at once, so the resumed run still reports them.
    held_out = ["train.held_out_tools=true"]
    process = subprocess.Popen(train_command(run, *held_out), cwd="/", env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list((run / "resume").glob("step_*/complete")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first resume state"
        time.sleep(0.02)
    # SIGKILL the training process mid-step, with anything it started. (One process runs without
    # a launcher; a launcher's workers sit in a session of their own, which killpg would miss.)
    workers = descendants(process.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    for pid in workers:
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
            time.sleep(0.01)
    assert not (run / "final").exists()
    killed_at = max(r["step"] for r in metrics(run))
    cut = json.loads((run / "held_out.json").read_text())
    assert set(cut) == {"examples", "before"} and cut["examples"] > 0
    result = run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}", *RUN, *held_out, "--resume")
    assert_same_run(run, uninterrupted)
    reported = json.loads((run / "held_out.json").read_text())
    assert reported["before"] == cut["before"] and reported["after"]["lm_loss"] < cut["before"]["lm_loss"]
    assert not list(run.glob("*.partial")) and all((p / "complete").is_file() for p in (run / "resume").glob("step_*"))
    resumed_from = result.stderr.split("resumed from ", 1)[1].split(" ")[0]
    print(f"SIGKILL after logging step {killed_at}; resumed from {resumed_from}; steps 1-14 equal the uninterrupted run")


@pytest.mark.slow
def test_cold_and_warm_feature_cache_train_the_same(tiny_default, tmp_path):
    """A run that extracts its features (cold cache) and one that reads them (warm) end with the
    same weights: extraction's draws from the RNG must not move the model's initialisation."""
    cache = f"data.feature_cache_dir={tmp_path / 'features'}"
    # 12 of the bundled media requests, every modality among them: extraction is what differs.
    rows = json.loads((DATA / "toolmmbench_sample" / "media_requests.json").read_text())[::10]
    assert {r["input_modality"] for r in rows} == {"image", "audio", "video"}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    data = [f"data.train_files=[{{path: {tmp_path / 'rows.json'}, media_root: {DATA}}}]", "data.eval_files=[]",
            "data.split.test_fraction=0.0"]
    weights = []
    for name in ("cold", "warm"):
        run = tmp_path / name
        result = run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}", cache, *data,
                           "train.max_steps=2", "model.tuning=lora", "train.micro_batch_size=4", "train.gradient_accumulation_steps=1")
        assert ("extracting" in result.stderr) == (name == "cold")  # the cold run encoded media, the warm one did not
        weights.append(load_file(run / "final" / "trainable.safetensors"))
    cold, warm = weights
    assert cold.keys() == warm.keys() and any("input_projector" in k for k in cold)
    assert all(torch.equal(cold[k], warm[k]) for k in cold)


def test_missing_hostfile_is_named(tmp_path):
    """A HOSTFILE that does not exist stops the launch (DeepSpeed would train on this machine alone)."""
    missing = tmp_path / "hostfile"
    result = subprocess.run(train_command(tmp_path / "run"), cwd="/", capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, "HOSTFILE": str(missing)})
    assert result.returncode == 2 and f"HOSTFILE={missing}: no such file" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_deepspeed_hostfile_launch_is_the_same_run(uninterrupted, tmp_path):
    """scripts/train.sh with HOSTFILE goes through DeepSpeed's launcher (the multi-node path; here
    one local node, --no_ssh since CI has no ssh server): the same steps, losses and weights as a
    plain process."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    run = tmp_path / "hostfile_run"
    env = {**os.environ, "PYTHON": sys.executable, "HOSTFILE": str(hostfile), "DS_LAUNCHER_ARGS": "--no_ssh --node_rank 0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + os.getpid() % 300)}
    result = subprocess.run(train_command(run), cwd="/", env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deepspeed.launcher.launch" in result.stderr + result.stdout  # DeepSpeed's launcher, not torchrun
    assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_corrupt_latest_resume_state_falls_back_to_the_previous(uninterrupted, tmp_path):
    run = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, run)
    # The run "died" after saving step 14, whose state then got truncated on disk.
    for name in ("final", "checkpoint-14"):
        shutil.rmtree(run / name)
    states = sorted((run / "resume").glob("step_14/*model_states.pt"))
    assert states
    data = states[0].read_bytes()
    states[0].write_bytes(data[: len(data) // 2])
    result = run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}", *RUN, "--resume")
    assert "resume state" in result.stderr and "step_14 is unreadable" in result.stderr
    assert "resumed from step_12" in result.stderr
    assert_same_run(run, uninterrupted)


def test_state_without_completion_marker_is_not_resumed(tmp_path):
    from toollmm.run_state import latest_resume_tag, mark_complete

    for step in (2, 4):
        (tmp_path / "resume" / f"step_{step}").mkdir(parents=True)
    mark_complete(tmp_path, "step_2")  # step_4 was being written when the run was killed
    assert latest_resume_tag(tmp_path) == "step_2"


@pytest.mark.slow
def test_corrupt_checkpoint_file_gets_a_clear_message(uninterrupted, tmp_path):
    ckpt = tmp_path / "checkpoint-14"
    shutil.copytree(uninterrupted / "checkpoint-14", ckpt)
    weights = ckpt / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="trainable.safetensors is truncated or corrupt.*use another checkpoint"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------- bad data


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels (a decompression bomb), with no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def row(query, tool="openai/whisper-base", modality="text", path=None, **extra):
    key = {"image": "image_path", "audio": "audio_path", "video": "video_path"}.get(modality) if isinstance(modality, str) else None
    out = {"id": extra.pop("id", 0), "input_modality": modality, "image_path": "", "audio_path": "", "video_path": "",
           "conversations": [{"from": "human", "value": query}, {"from": "gpt", "value": tool}], **extra}
    if key:
        out[key] = path
    return out


def build_fuzz(root: Path) -> tuple[list[Path], int, dict[str, int], int]:
    """Data files holding good rows and bad inputs; returns (files, good rows, bad rows per reason, bad files)."""
    media = root / "media"
    media.mkdir()
    assets, pairs = DATA / "assets", DATA / "t2x_pairs"
    good_media = {"image": pairs / "cc3m" / "images", "audio": pairs / "audiocap" / "audios", "video": pairs / "webvid" / "videos"}
    good_rows, bad = [], {}

    def expect(reason, count=1):
        bad[reason] = bad.get(reason, 0) + count

    # Good rows: every bundled caption-pair medium once, and text rows.
    for modality, folder in good_media.items():
        for i, source in enumerate(sorted(folder.iterdir())):
            shutil.copy(source, media / f"{modality}_{i}{source.suffix}")
            good_rows.append(row(f"good {modality} request {i}", "facebook/detr-resnet-50", modality, f"{modality}_{i}{source.suffix}"))
    good_rows += [row(f"good text request number {i}", "google/flan-t5-base") for i in range(20)]

    # Broken media, each named by one row (counted as undecodable media).
    jpeg, wav, mp4 = (assets / "bird_image.jpg").read_bytes(), (assets / "test.wav").read_bytes(), (assets / "test.mp4").read_bytes()
    broken = {
        "image": [jpeg[: len(jpeg) // k] for k in (2, 3, 5, 9, 50)] + [b"", b"not an image at all", wav, mp4, png_header(40000, 40000),
                                                                       png_header(1, 1), os.urandom(3000)],
        "audio": [wav[: k] for k in (10, 44, 100)] + [b"", jpeg, mp4, b"RIFF\x00\x00\x00\x00WAVE", os.urandom(3000)],
        "video": [mp4[: len(mp4) // k] for k in (2, 3, 7, 20)] + [b"", jpeg, wav, b"\x00\x00\x00\x18ftypmp42", os.urandom(5000)],
    }
    rng = np.random.default_rng(1)
    for modality, blobs in broken.items():  # random bytes of assorted sizes, and real headers with random bodies
        header = {"image": jpeg[:600], "audio": wav[:44], "video": mp4[:64]}[modality]
        blobs += [rng.bytes(int(n)) for n in rng.integers(1, 20000, 5)]
        blobs += [header + rng.bytes(int(n)) for n in rng.integers(10, 20000, 5)]
    bad_rows = []
    suffix = {"image": ".jpg", "audio": ".wav", "video": ".mp4"}
    for modality, blobs in broken.items():
        for i, blob in enumerate(blobs):
            name = f"broken_{modality}_{i}{suffix[modality]}"
            (media / name).write_bytes(blob)
            bad_rows.append(row(f"broken {modality} {i}", modality=modality, path=name))
    expect("undecodable media", sum(len(b) for b in broken.values()))

    # Paths out of the media folder.
    outside = root / "outside.jpg"
    shutil.copy(assets / "bird_image.jpg", outside)
    (media / "link_out.jpg").symlink_to(outside)
    for path in ("../outside.jpg", "../../../../etc/passwd", "/etc/passwd", str(outside), "link_out.jpg", "a/../../outside.jpg"):
        bad_rows.append(row("escape", modality="image", path=path))
    expect(OUTSIDE_ROOT, 6)

    # Malformed rows: wrong types, missing keys, unknown modality, empty fields.
    malformed = [
        "a string row", 42, None, [], {"id": 1},
        {"conversations": "not a list"}, {"conversations": []}, {"conversations": [{"from": "human", "value": "q"}]},
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "t"}]},
        {"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": "t"}]},
        {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "t"}]},
        {"conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "t"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": []}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": [1, 2]}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
        row("unknown modality", modality="smell"), row("no path", modality="image", path=""),
        row("path not a string", modality="audio", path=12), row("modality is a list", modality=["image"]),
        {"conversations": [["human", "q"], ["gpt", "t"]]}, {"conversations": None, "image_path": "x.jpg"},
    ]
    bad_rows += malformed
    expect("malformed row", len(malformed))

    # Over-long queries: nothing of the answer survives max_tgt_len.
    bad_rows += [row("describe " + "very " * (100 + 37 * i) + f"long request {i}") for i in range(10)]
    expect("answer cut entirely by max_tgt_len (over-long query)", 10)

    files = [root / "good_and_bad.json"]
    mixed = good_rows + bad_rows
    order = np.random.default_rng(0).permutation(len(mixed))
    files[0].write_text(json.dumps([mixed[i] for i in order]))

    # A file with invalid UTF-8 in two rows: those rows go, its good rows stay.
    utf8 = [row(f"clean row {i}", "google/flan-t5-base") for i in range(5)]
    text = json.dumps(utf8 + [row("BROKEN_ONE"), row("BROKEN_TWO")]).encode()
    text = text.replace(b"BROKEN_ONE", b"broken \xff\xfe one").replace(b"BROKEN_TWO", b"broken \xc3 two")
    files.append(root / "not_utf8.json")
    files[-1].write_bytes(text)
    good_rows += utf8
    expect("text is not valid UTF-8", 2)

    # Whole files that cannot be read: skipped and counted, the other files train.
    for name, content in (("invalid.json", b'[{"id": 1, "conversations": [}'), ("object.json", b'{"rows": []}'),
                          ("truncated.json", json.dumps(good_rows[:3]).encode()[:-40]), ("empty.json", b"")):
        files.append(root / name)
        files[-1].write_bytes(content)
    return files, len(good_rows), bad, 4


@pytest.mark.slow
def test_bad_inputs_are_counted_and_no_good_row_is_lost(tiny_default, tmp_path):
    files, good, bad, bad_files = build_fuzz(tmp_path)
    media = tmp_path / "media"
    train_files = "[" + ", ".join(f"{{path: {f}, media_root: {media}}}" for f in files) + "]"
    run = tmp_path / "run"
    result = run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}",
                       f"data.train_files={train_files}", "data.eval_files=[]", "data.split.test_fraction=0.0",
                       "data.missing_media=skip", "data.max_tgt_len=64", f"data.feature_cache_dir={tmp_path / 'cache'}",
                       "train.max_steps=3", "train.micro_batch_size=4", "train.gradient_accumulation_steps=1")
    report = json.loads((run / "data_report.json").read_text())
    bad_rows = sum(bad.values())
    tried = bad_rows + bad_files
    assert tried >= 100, tried
    assert report["skipped"] == {**bad, "unreadable data file (whole file)": bad_files}
    assert report["used"] == good  # no good row lost
    assert f"{good} training examples" in result.stderr
    for reason in bad:
        assert reason in result.stderr  # in the log, too
    assert len(metrics(run)) == 3 and (run / "final" / "trainable.safetensors").is_file()
    print(f"bad inputs tried: {tried} ({bad_rows} rows by reason {bad}, {bad_files} whole files); good rows {good}, lost 0")


def test_media_paths_stay_inside_their_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.jpg").write_bytes(b"x")
    (tmp_path / "secret.wav").write_bytes(b"x")
    (root / "inside_link.jpg").symlink_to(root / "sub" / "ok.jpg")
    (root / "outside_link.wav").symlink_to(tmp_path / "secret.wav")
    rows = [row("ok", modality="image", path="sub/ok.jpg"), row("link in", modality="image", path="inside_link.jpg"),
            row("dots", modality="audio", path="../secret.wav"), row("abs", modality="audio", path=str(tmp_path / "secret.wav")),
            row("link out", modality="audio", path="outside_link.wav"), row("passwd", modality="audio", path="../../../../etc/passwd")]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    records, report = read_toolmmbench(data, root, "skip")
    assert [r.query for r in records] == ["ok", "link in"]
    assert report.skipped == {OUTSIDE_ROOT: 4} and "refused" in report.examples[OUTSIDE_ROOT][0]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"image_name": "../secret.wav", "caption": "c"}, {"image_name": "sub/ok.jpg", "caption": "c"}]))
    captions, report = read_caption_file(pairs, root, "image", need_media=True)
    assert len(captions) == 1 and report.skipped == {OUTSIDE_ROOT: 1}


# --------------------------------------------------------------------------- numerical faults


@pytest.mark.slow
def test_non_finite_losses_are_skipped_and_counted(tiny_default, tmp_path):
    # A corrupt caption embedding (NaN) makes the loss of every batch holding it non-finite.
    embed = tmp_path / "embed"
    run_entry("process_embeddings.py", "--modality", "audio", "--decoder",
              str(ROOT / "pretrained_checkpoint" / "diffusion_ckpt" / "tiny_audioldm"),
              "--captions", str(DATA / "t2x_pairs" / "audiocap" / "audiocap.json"), "--out", str(embed))
    poisoned = sorted(embed.glob("*.npy"))[0]
    np.save(poisoned, np.full(512, np.nan, np.float32), allow_pickle=False)
    audio = f"[{{modality: audio, path: {DATA}/t2x_pairs/audiocap/audiocap.json, media_root: x, embeddings_dir: {embed}}}]"
    run = tmp_path / "run"
    run_entry("train.py", "--stage", "2", "--config", str(TINY_CONFIG), "--config", str(CHAIN_CONFIG),
              f"train.output_dir={run}", f"data.caption_files={audio}", "train.init_from=null", "data.split.test_fraction=0.0",
              "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.epochs=3")
    rows = metrics(run)
    skipped = rows[-1]["nonfinite_skipped"]
    assert skipped == 3  # the poisoned caption's batch, once per epoch
    assert len(rows) == 3 * 4 - skipped and all(np.isfinite(r["loss"]) for r in rows)
    weights = load_file(run / "final" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    print(f"non-finite losses injected and skipped: {skipped}; steps trained: {len(rows)}")


@pytest.mark.slow
def test_divergence_stops_with_a_clear_message_and_a_usable_checkpoint(tiny_default, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(AssertionError) as failure:
        run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}",
                  "train.learning_rate=1000000.0", "train.warmup_rate=0.0", "train.max_nonfinite_in_a_row=3",
                  "train.save_every_steps=1", "train.micro_batch_size=4", "train.gradient_accumulation_steps=1",
                  "train.max_steps=200")
    message = str(failure.value)
    assert "train: 3 micro-batches in a row had a non-finite loss" in message and "lower the learning rate" in message
    # The checkpoint named is the newest one whose weights then gave a finite loss; the one
    # written after it (weights already blown up by the 1e6 step) is named as untried.
    trusted = Path(message.split("The last checkpoint whose weights gave a finite loss is ", 1)[1].split(" ", 1)[0])
    newest = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert trusted.parent == run and trusted != newest and f"({newest.name}, written since, gave no finite loss yet)" in message
    model, _, _, _ = load_checkpoint(trusted)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    print(f"divergence stopped after {len(metrics(run))} steps; named {trusted.name} (finite loss), not {newest.name}")


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("stage,layers", [
    (1, []), (2, []), (3, []), (3, ["any_to_any.yaml"]), (3, ["tiny.yaml"]), (3, ["small.yaml"]), (3, ["small.yaml", "small_published.yaml"]),
    (1, ["tiny.yaml", "tiny_chain.yaml"]), (2, ["tiny.yaml", "tiny_chain.yaml"]),
    (3, ["any_to_any.yaml", "tiny.yaml", "tiny_chain.yaml"]),
])
def test_every_shipped_config_validates(stage, layers):
    config = load_config(stage, [CONFIG_DIR / name for name in layers])
    assert config.train.stage == stage


@pytest.mark.parametrize("layers", [["gpu_smoke.yaml"], ["gpu_smoke.yaml", "speed_published.yaml"],
                                    ["gpu_smoke.yaml", "speed_fast.yaml"]])
def test_bench_configs_validate(layers):
    load_config(3, [TINY_CONFIG] + [ROOT / "bench" / name for name in layers])


def test_gpu_stage2_config_validates():
    load_config(2, [TINY_CONFIG, CHAIN_CONFIG, ROOT / "bench" / "gpu_stage2.yaml"])


@pytest.mark.parametrize("override,key", [("train.max_nonfinite_in_a_row=many", "train.max_nonfinite_in_a_row"),
                                          ("model.outputs.image.target_dim=wide", "model.outputs.image.target_dim"),
                                          ("train.packing=maybe", "train.packing"), ("data.splitt.seed=1", "data.splitt")])
def test_invalid_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(3, overrides=[override])


def test_a_second_trainer_on_the_same_run_is_refused(tmp_path):
    from toollmm.run_state import hold_run_lock

    first = hold_run_lock(tmp_path)
    script = f"from toollmm.run_state import hold_run_lock; hold_run_lock(__import__('pathlib').Path({str(tmp_path)!r}))"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.returncode != 0 and f"another training process (pid {os.getpid()}) is writing to" in other.stderr
    first.close()  # released (as on any exit, SIGKILL included)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 0


def test_fp16_loss_scale_events_reach_the_metrics():
    """DeepSpeed's fp16 path does not run on a CPU ("Type fp16 is not supported on your device"),
    so this checks the reading of the attributes its ZeRO optimizer and engine expose
    (``optimizer.cur_scale``, ``engine.skipped_steps``) on a stand-in."""
    from types import SimpleNamespace

    from toollmm.engine import loss_scale_events

    engine = SimpleNamespace(optimizer=SimpleNamespace(cur_scale=32768.0), skipped_steps=2)
    fp16 = load_config(3, overrides=["model.dtype=fp16"])
    assert loss_scale_events(engine, fp16) == {"overflow_skipped_steps": 2, "loss_scale": 32768.0}
    assert loss_scale_events(engine, load_config(3)) == {}
