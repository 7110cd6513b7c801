"""The three stages chained through the entry scripts on the tiny default (CPU, DeepSpeed on gloo):
caption embeddings → stage 1 → stage 2 → stage 3, each starting from the previous checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, ROOT, TINY_CONFIG, run_entry

pytestmark = pytest.mark.slow

LAYERS = ["--config", str(TINY_CONFIG), "--config", str(CONFIGS / "tiny_chain.yaml")]
SMALL = ["train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "train.log_every_steps=1"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tiny_default, tmp_path_factory):
    runs = tmp_path_factory.mktemp("chain")
    run_entry("process_embeddings.py", "--stage", "2", *LAYERS)
    run_entry("train.py", "--stage", "1", *LAYERS, f"train.output_dir={runs / 'stage_1'}", "train.max_steps=4", *SMALL)
    run_entry("train.py", "--stage", "2", *LAYERS, f"train.output_dir={runs / 'stage_2'}",
              f"train.init_from={runs / 'stage_1' / 'final'}", "train.epochs=6", *SMALL)
    # Only the caption instructions, so every batch has X → text and text → X rows; LoRA as
    # published; packed rows (the fast path) through DeepSpeed.
    run_entry("train.py", "--stage", "3", "--config", str(CONFIGS / "any_to_any.yaml"), *LAYERS,
              f"train.output_dir={runs / 'stage_3'}", f"train.init_from={runs / 'stage_2' / 'final'}",
              "data.train_files=[]", "data.eval_files=[]", "model.tuning=lora", "train.max_steps=6", *SMALL,
              "train.packing=true", "train.pack_length=256", "train.pack_width_multiple=64")
    return runs


def weights(run):
    return load_file(run / "final" / "trainable.safetensors")


def test_stage_1_trains_the_input_projector_on_caption_pairs(chain):
    report = json.loads((chain / "stage_1" / "data_report.json").read_text())
    assert report["rows"] == 39 and report["skipped"] == {"missing media": 3}  # the 3 missing WebVid videos
    assert len(metrics(chain / "stage_1")) == 4
    held_out = json.loads((chain / "stage_1" / "held_out.json").read_text())
    assert held_out["examples"] > 0 and {"before", "after"} <= set(held_out)


def test_stage_2_starts_from_stage_1_and_moves_only_its_parts(chain):
    one, two = weights(chain / "stage_1"), weights(chain / "stage_2")
    assert set(one) == set(two)
    assert torch.equal(one["input_projector.weight"], two["input_projector.weight"])  # frozen in stage 2
    for name in ("signal_rows.input_embeddings", "signal_rows.output_embeddings", "output_projectors.video.model.weight"):
        assert not torch.equal(one[name], two[name]), name
    meta = json.loads((chain / "stage_2" / "final" / "checkpoint.json").read_text())
    assert meta["stage"] == 2 and meta["outputs"]["signal_tokens"]["tokens"]["[AUD7]"] == 3037


def test_stage_2_lowers_held_out_caption_mse(chain):
    held_out = json.loads((chain / "stage_2" / "held_out.json").read_text())
    for modality in ("image", "video", "audio"):
        key = f"mse_{modality}"
        if key in held_out["before"]:
            assert held_out["after"][key] < held_out["before"][key], (key, held_out)
    assert {"mse_image", "mse_video"} <= set(held_out["before"])
    assert any("mse_image" in row for row in metrics(chain / "stage_2"))


def test_stage_3_mixes_generation_rows_and_trains_lora(chain):
    two, three = weights(chain / "stage_2"), weights(chain / "stage_3")
    lora = [n for n in three if ".lora_A." in n or ".lora_B." in n]
    assert lora and set(three) - set(lora) == set(two)
    assert not torch.equal(two["output_projectors.image.model.weight"], three["output_projectors.image.model.weight"])
    assert not torch.equal(two["input_projector.weight"], three["input_projector.weight"])
    rows = metrics(chain / "stage_3")
    assert len(rows) == 6 and any(k.startswith("mse_") for row in rows for k in row)
    assert rows[-1]["samples_seen"] == 6 * 4


def test_stage_2_through_deepspeed_leaves_the_base_vocabulary_rows(chain):
    from conftest import TINY_LLM

    base = load_file(TINY_LLM / "model.safetensors")
    state_file = sorted((chain / "stage_2" / "resume").glob("step_*/mp_rank_00_model_states.pt"))[-1]
    module = torch.load(state_file, weights_only=True, map_location="cpu")["module"]
    for name, base_name in (("llm.model.embed_tokens.weight", "model.embed_tokens.weight"), ("llm.lm_head.weight", "lm_head.weight")):
        trained = module[name]
        assert trained.shape[0] == 3038
        assert torch.equal(trained[:3000], base[base_name]), name
        assert torch.equal(trained[3000:], weights(chain / "stage_2")[
            "signal_rows.input_embeddings" if "embed" in name else "signal_rows.output_embeddings"]), name


def test_stage_2_on_two_ranks_under_zero_2_and_3(chain, tmp_path):
    """Caption batches of different modalities on the two ranks (an output projector used on one
    rank only) made ZeRO-2's gradient all-reduce fail and ZeRO-3 hang; now both run, alike."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from conftest import TINY_LLM

    runs = {stage: tmp_path / f"zero{stage}" for stage in (2, 3)}
    for stage, run in runs.items():
        run_entry("train.py", "--stage", "2", *LAYERS, f"train.output_dir={run}", f"train.init_from={chain / 'stage_1' / 'final'}",
                  "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.train_batch_size=4",
                  "train.max_steps=4", f"train.zero_stage={stage}", env={"NPROC": "2"})
    assert [r["loss"] for r in metrics(runs[3])] == pytest.approx([r["loss"] for r in metrics(runs[2])], rel=1e-5)
    a, b = weights(runs[2]), weights(runs[3])
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    # ZeRO-3 keeps the row mask: the base vocabulary rows of the (sharded) matrices never moved.
    base = load_file(TINY_LLM / "model.safetensors")
    state = get_fp32_state_dict_from_zero_checkpoint(str(runs[3] / "resume"), tag="step_4")
    for name, base_name in (("llm.model.embed_tokens.weight", "model.embed_tokens.weight"), ("llm.lm_head.weight", "lm_head.weight")):
        assert torch.equal(state[name][:3000].to(base[base_name].dtype), base[base_name]), name
