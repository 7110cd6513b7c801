"""The entry scripts end to end on the tiny default, on CPU with DeepSpeed (gloo): train → resume →
inference → evaluate, and the published LoRA recipe."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from conftest import ROOT, TINY_CONFIG, run_entry
import toollmm.cli.inference as inference_cli

pytestmark = pytest.mark.slow

SMALL = ["train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.max_steps=6",
         "train.save_every_steps=3", "train.keep_last=5", "train.log_every_steps=1"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_default, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}", *SMALL,
              "train.profile_steps=2")
    return run


def test_profiled_steps_leave_an_operator_table_and_a_trace(trained):
    table = (trained / "profile.txt").read_text()
    assert table.startswith("2 optimizer steps after 3") and "aten::mm" in table
    trace = json.loads((trained / "profile_trace.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])


def test_training_writes_checkpoints_logs_and_learns(trained):
    records = metrics(trained)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "token_accuracy", "lr", "samples_seen", "elapsed_s"} <= set(records[0])
    assert records[-1]["samples_seen"] == 6 * 2 * 4
    assert records[-1]["loss"] < records[0]["loss"]
    for name in ("checkpoint-3", "checkpoint-6", "final"):
        assert (trained / name / "trainable.safetensors").is_file()
    assert sorted(p.name for p in (trained / "resume").iterdir() if p.is_dir()) == ["step_3", "step_6"]
    assert list((trained / "tensorboard").iterdir())
    report = json.loads((trained / "data_report.json").read_text())
    # 13 ToolMMBench queries are longer than max_tgt_len 256 on their own: nothing of their answer is left.
    assert report["text_only"] > 3000 and report["skipped"] == {"answer cut entirely by max_tgt_len (over-long query)": 13}
    assert not list(trained.glob("*.partial"))


def test_warmup_then_decay_schedule(trained):
    lrs = [r["lr"] for r in metrics(trained)]
    # DeepSpeed's WarmupDecayLR as published: log warm-up over max(2, 10% of 6) = 2 iterations
    # starting at 0, then linear decay. DeepSpeed steps the scheduler after the optimizer, so
    # optimizer step k uses iteration k-2 (step 1 the initial minimum): two steps at lr 0.
    assert lrs == [0.0, 0.0, pytest.approx(0.002), pytest.approx(0.002), pytest.approx(0.0015), pytest.approx(0.001)]


def test_resume_continues_step_count_schedule_and_dropout(tiny_default, tmp_path):
    # LoRA (dropout 0.1): matching losses after the resume also proves the RNG stream continues.
    lora = ["model.tuning=lora", "train.learning_rate=0.001"]
    trained = tmp_path / "uninterrupted"
    run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={trained}", *SMALL, *lora)
    run = tmp_path / "resumed"
    shutil.copytree(trained, run)
    first = metrics(trained)
    # Pretend the run died after step 3.
    shutil.rmtree(run / "checkpoint-6")
    shutil.rmtree(run / "resume" / "step_6")
    shutil.rmtree(run / "final")
    (run / "resume" / "latest").write_text("step_3")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first[:3]))
    run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}", *SMALL, *lora, "--resume")
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(first[3:], resumed[3:]):
        assert after["lr"] == pytest.approx(before["lr"], rel=1e-9)
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-4)
        assert after["samples_seen"] == before["samples_seen"]
    a = load_file(trained / "checkpoint-6" / "trainable.safetensors")
    b = load_file(run / "checkpoint-6" / "trainable.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def refused_in_process(monkeypatch, *args: str) -> str:
    """The training command's refusal, run in this process: the checks before the process group
    starts raise the CLI's one-line exit (no launch: a training process start costs ~9 s of CI).
    Building a model, or starting the process group, would fail the test."""
    import toollmm.recipe as recipe
    from toollmm.cli import train as train_cli

    def forbidden(*_, **__):
        raise AssertionError("got past the checks")

    monkeypatch.setattr(recipe, "build_model", forbidden)
    monkeypatch.setattr(recipe, "init_distributed", forbidden)
    with pytest.raises(SystemExit) as refused:
        train_cli.main(["--stage", "3", "--config", str(TINY_CONFIG), *args])
    assert str(refused.value).startswith("train: ") and "\n" not in str(refused.value)
    return str(refused.value)


def test_existing_run_needs_resume_flag(trained, monkeypatch):
    assert "Pass --resume to continue it" in refused_in_process(monkeypatch, f"train.output_dir={trained}", *SMALL)


def test_flex_attention_on_cpu_is_refused_before_training(tmp_path, monkeypatch):
    message = refused_in_process(monkeypatch, f"train.output_dir={tmp_path}/run", "model.attn_implementation=flex_attention",
                                 "train.packing=true", *SMALL)
    # refused before any model work, not crashed in a backward
    assert re.search("flex_attention trains on CUDA only .* set model.attn_implementation=sdpa", message)
    assert message.startswith("train: model.attn_implementation=flex_attention")
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "final").exists()


def test_pack_length_shorter_than_an_example_is_refused_before_training(tmp_path):
    with pytest.raises(AssertionError, match=r"train.pack_length=64 is shorter than the longest example \((\d+) tokens.*set train.pack_length=\1 or more") as err:
        run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={tmp_path}/run",
                  "train.packing=true", "train.pack_length=64", *SMALL)
    assert "trainable parameters" not in str(err.value)  # refused before the model was built
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_resume_without_state_is_a_clear_error(tmp_path, monkeypatch):
    message = refused_in_process(monkeypatch, f"train.output_dir={tmp_path}/new", "--resume")
    assert re.search("train: --resume given but .* holds no complete training state; drop --resume", message)


def test_inference_and_evaluation(trained, tmp_path):
    predictions = tmp_path / "predictions.json"
    run_entry("inference.py", "--ckpt", str(trained / "final"), "--split", "test", "--limit", "6",
              "--output", str(predictions), "inference.max_new_tokens=8")
    rows = json.loads(predictions.read_text())
    assert len(rows) == 6
    assert set(rows[0]) == {"question_id", "questions", "response", "tool", "input_modality", "acceptable",
                            "ambiguity", "ifambiguity", "onetomulti"}
    result = run_entry("evaluate.py", "--ckpt", str(trained / "final"), "--predictions", str(predictions),
                       "--output-dir", str(tmp_path / "eval"))
    assert "| overall | 6 |" in result.stdout
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["overall"]["n"] == 6 and report["baseline"]["overall"]["n"] == 6
    assert (tmp_path / "eval" / "report.md").read_text().startswith("# ")


def test_published_lora_recipe_trains_only_lora_and_projector(tiny_default, tmp_path):
    run = tmp_path / "lora"
    run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}",
              "model.tuning=lora", "train.learning_rate=0.0005", "train.micro_batch_size=2",
              "train.gradient_accumulation_steps=2", "train.max_steps=3")  # steps 1-2 run at lr 0
    state = load_file(run / "final" / "trainable.safetensors")
    assert {"input_projector.weight", "input_projector.bias"} <= set(state)
    assert all(".lora_A." in k or ".lora_B." in k for k in state if not k.startswith("input_projector"))
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)  # B starts at zero and moved
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()


def test_bad_batch_arithmetic_fails_before_the_model_is_built(tmp_path, monkeypatch):
    assert "Set train.train_batch_size=16" in refused_in_process(monkeypatch, f"train.output_dir={tmp_path}/x", "train.train_batch_size=7")


def test_inference_on_a_published_file_scored_against_it(trained, tmp_path):
    from conftest import DATA

    combined = DATA / "toolmmbench" / "combined_data.json"
    predictions = tmp_path / "predictions.json"
    inference_cli.main(["--ckpt", str(trained / "final"), "--data", str(combined), "--limit", "3",
                        "--output", str(predictions), "inference.max_new_tokens=4"])
    assert [r["question_id"] for r in json.loads(predictions.read_text())] == [
        "combined_data:audio/1", "combined_data:audio/2", "combined_data:audio/3"]
    run_entry("evaluate.py", "--ckpt", str(trained / "final"), "--predictions", str(predictions),
              "--references", str(combined), "--allow-missing", "--output-dir", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["overall"]["n"] == 1917 and metrics["missing_predictions"] == 1914


def test_two_ranks_on_gloo(tiny_default, tmp_path):
    run = tmp_path / "ddp"
    run_entry("train.py", "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}",
              "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.train_batch_size=4",
              "train.max_steps=3", env={"NPROC": "2"})
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["samples_seen"] == 3 * 2 * 2  # both ranks' samples count
    assert (run / "final" / "trainable.safetensors").is_file()
    states = sorted(p.name for p in (run / "resume" / "step_3").iterdir())
    assert "rng_rank0.pt" in states and "rng_rank1.pt" in states


def test_zero3_shards_the_weights_trains_as_zero2_and_resumes(tiny_default, tmp_path):
    args = ["--stage", "3", "--config", str(TINY_CONFIG), "model.tuning=lora", "train.micro_batch_size=2",
            "train.gradient_accumulation_steps=1", "train.train_batch_size=4", "train.max_steps=6", "train.save_every_steps=3"]
    runs = {stage: tmp_path / f"zero{stage}" for stage in (2, 3)}
    for stage, run in runs.items():
        result = run_entry("train.py", *args, f"train.output_dir={run}", f"train.zero_stage={stage}", env={"NPROC": "2"})
        if stage == 3:  # the base loads as shards (never whole on a rank); each rank keeps half of every weight
            log = result.stderr + result.stdout
            assert "ZeRO-3: the LLM loaded as shards, rank 0 holding 2350208 of the 4700416 weight elements (50.0%)" in log
            assert "ZeRO-3: between uses, rank 0 holds 2612480 of the 5224960 weight elements (50.0%)" in log
    two, three = metrics(runs[2]), metrics(runs[3])
    assert [r["loss"] for r in three] == pytest.approx([r["loss"] for r in two], rel=1e-5)
    a, b = (load_file(run / "final" / "trainable.safetensors") for run in runs.values())
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)  # whole tensors, not a rank's shard
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # A ZeRO-3 run killed after step 3 resumes to the same weights.
    resumed = tmp_path / "zero3_resumed"
    shutil.copytree(runs[3], resumed)
    for done in (resumed / "checkpoint-6", resumed / "resume" / "step_6", resumed / "final"):
        shutil.rmtree(done)
    (resumed / "resume" / "latest").write_text("step_3")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in three[:3]))
    run_entry("train.py", *args, f"train.output_dir={resumed}", "train.zero_stage=3", "--resume", env={"NPROC": "2"})
    assert [r["loss"] for r in metrics(resumed)] == pytest.approx([r["loss"] for r in three], rel=1e-6)
    c = load_file(resumed / "final" / "trainable.safetensors")
    assert max((b[k] - c[k]).abs().max().item() for k in b) < 1e-6


def test_inference_settings_come_from_the_checkpoint_config(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "final", ckpt)
    text = (ckpt / "config.yaml").read_text()
    assert "constrained: false" in text and "top_k: 1" in text
    (ckpt / "config.yaml").write_text(text.replace("constrained: false", "constrained: true").replace("top_k: 1", "top_k: 3"))
    predictions = tmp_path / "predictions.json"
    # In this process (test_inference_and_evaluation runs the command itself): a process start costs CI ~5 s.
    inference_cli.main(["--ckpt", str(ckpt), "--split", "test", "--limit", "4", "--output", str(predictions)])
    rows = json.loads(predictions.read_text())
    assert all(row["tool"] is not None and len(row["top_k"]) == 3 for row in rows)
    inference_cli.main(["--ckpt", str(ckpt), "--split", "test", "--limit", "2", "inference.constrained=false",
                        "inference.top_k=1", "inference.max_new_tokens=4", "--output", str(predictions)])
    assert all("top_k" not in row for row in json.loads(predictions.read_text()))
    # An override the config does not know is refused by name, before the model loads.
    with pytest.raises(AssertionError, match=r"inference: unknown config key inference.topk; allowed here: .*top_k") as err:
        run_entry("inference.py", "--ckpt", str(ckpt), "--split", "test", "inference.topk=3", "--output", str(predictions))
    assert "model loaded" not in str(err.value)


def test_answering_attention_backend_is_an_inference_setting(trained, tmp_path):
    """inference.attn_implementation swaps the attention kernels of a trained checkpoint (the
    same maths: the same answers), and an unknown backend is refused by name before loading."""
    from toollmm.checkpoint import load_for_inference
    from toollmm.config import ConfigError

    default, _, _, _ = load_for_inference(trained / "final", "cpu")
    eager, _, config, _ = load_for_inference(trained / "final", "cpu", overrides=["inference.attn_implementation=eager"])
    assert default.llm.config._attn_implementation == "sdpa" and eager.llm.config._attn_implementation == "eager"
    assert config.inference.attn_implementation == "eager"
    answers = {}
    for backend in ("sdpa", "eager"):
        predictions = tmp_path / f"{backend}.json"
        inference_cli.main(["--ckpt", str(trained / "final"), "--split", "test", "--limit", "6", "inference.constrained=true",
                            f"inference.attn_implementation={backend}", "--output", str(predictions)])
        answers[backend] = [row["tool"] for row in json.loads(predictions.read_text())]
    assert answers["eager"] == answers["sdpa"] and len(answers["sdpa"]) == 6
    with pytest.raises(ConfigError, match=r"inference.attn_implementation: 'flex_attention' is not one of"):
        load_for_inference(trained / "final", "cpu", overrides=["inference.attn_implementation=flex_attention"])


def test_training_steps_run_in_training_mode(tiny_default, tmp_path):
    """from_pretrained leaves the base in eval mode (LoRA's new dropout modules start in train
    mode): the loop must switch the whole model, or the decoder layers' activation checkpointing
    silently does nothing. A stage-3 run has no held-out evaluation (which switched stages 1-2
    back to train mode), so it is the one to check."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import sys
        import toollmm.cli.train as train
        import toollmm.recipe as recipe

        seen = []
        build = recipe.build_model

        def build_and_watch(*args, **kwargs):
            model = build(*args, **kwargs)
            dropout = next(m for n, m in model.named_modules() if n.endswith("lora_dropout.default"))
            for module in (dropout, model.decoder_layers()[0]):
                module.register_forward_pre_hook(lambda module, inputs: seen.append(module.training))
            return model

        recipe.build_model = build_and_watch
        train.main(sys.argv[1:])
        print("TRAINING_MODE", sum(seen), len(seen))
    """))
    result = subprocess.run(
        [sys.executable, str(driver), "--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={tmp_path / 'run'}",
         "model.tuning=lora", "train.max_steps=2", "train.micro_batch_size=2", "train.gradient_accumulation_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT / "code")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("TRAINING_MODE"))
    in_training, calls = map(int, line.split()[1:])
    assert calls > 0 and in_training == calls


def test_setup_stops_before_installing_on_a_full_disk(tmp_path):
    # A copy of the project's install files in an empty folder: setup.sh must refuse before it
    # creates .venv, and name the folder and the space it needs.
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts")
    for name in ("requirements-reference.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path)
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "TOOLLMM_SETUP_NEEDS_GB": "1000000000"})
    assert result.returncode == 1
    assert "installing .venv needs about 1000000000 GB" in result.stderr and str(tmp_path) in result.stderr
    assert not (tmp_path / ".venv").exists()
