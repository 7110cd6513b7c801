"""Config loading: every shipped config validates; errors name the key and the fix before any model is built."""

import dataclasses
import re

import pytest

from conftest import TINY_CONFIG
from toollmm.config import (CONFIG_DIR, DEEPSPEED_KEYS, INFERENCE_OVERRIDES, CaptionFile, ConfigError, DataFile,
                            apply_inference_overrides, check_batch_arithmetic, check_paths, load_config)
from toollmm.config_help import config_keys, field_docs
from toollmm.engine import deepspeed_config, planned_steps, run_settings


def test_shipped_configs_load():
    published = load_config(3)
    assert (published.model.lora.r, published.model.lora.alpha, published.model.lora.dropout) == (32, 32, 0.1)
    assert published.model.lora.target_modules is None  # the family's row: LLaMA's q/k/v/o (test_families.py)
    assert published.data.max_tgt_len == 512 and published.train.epochs == 5
    tiny = load_config(3, [TINY_CONFIG])
    assert tiny.model.tuning == "full" and tiny.data.split.test_fraction == 0.15
    check_paths(tiny)  # the tiny default and bundled data are present
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == ["any_to_any.yaml", "base.yaml", "small.yaml",
                                                                 "small_published.yaml", "stage_1.yaml", "stage_2.yaml", "stage_3.yaml", "tiny.yaml", "tiny_chain.yaml"]


def test_published_deepspeed_values():
    config = load_config(3, overrides=["train.train_batch_size=64"])
    ds = deepspeed_config(config, world_size=4, total_steps=1000)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 2
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["weight_decay"]) == (0.0005, [0.9, 0.95], 0.001)
    scheduler = ds["scheduler"]
    assert scheduler["type"] == "WarmupDecayLR"
    assert scheduler["params"]["total_num_steps"] == 1000 and scheduler["params"]["warmup_num_steps"] == 100
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["bf16"]["check_grad_overflow"]  # DeepSpeed's default; the fast bench path turns it off
    fast = deepspeed_config(load_config(3, overrides=["train.grad_overflow_check=false"]), world_size=1, total_steps=10)
    assert fast["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["zero_optimization"]["stage"] == 2  # base.yaml's, unless train.zero_stage says otherwise
    sharded = deepspeed_config(load_config(3, overrides=["train.zero_stage=3"]), world_size=2, total_steps=10)
    assert sharded["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match=r"train\.zero_stage must be 1, 2 or 3"):
        load_config(3, overrides=["train.zero_stage=4"])


def test_every_stage_builds_the_published_optimizer_from_its_yaml():
    """Every stage, from base.yaml alone: AdamW (DeepSpeed's Adam in AdamW mode) 5e-4, betas (0.9, 0.95),
    eps 1e-8, weight decay 0.001, WarmupDecayLR from 0, clip 1.0, ZeRO-2; fp16 and bf16 as model.dtype says."""
    for stage in (1, 2, 3):
        ds = deepspeed_config(load_config(stage), world_size=2, total_steps=100)
        assert ds["optimizer"] == {"type": "Adam", "params": {"lr": 0.0005, "betas": [0.9, 0.95], "eps": 1e-8,
                                   "weight_decay": 0.001, "torch_adam": True, "adam_w_mode": True}}
        assert ds["scheduler"] == {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.0005,
                                   "warmup_num_steps": 10, "total_num_steps": 100}}
        assert (ds["gradient_clipping"], ds["zero_optimization"]["stage"]) == (1.0, 2)
    tuned = load_config(3, overrides=["train.betas=[0.8, 0.99]", "train.weight_decay=0", "train.adam_eps=1e-6",
                                      "train.gradient_clipping=0.5", "model.dtype=fp16", "train.learning_rate=0.001"])
    ds = deepspeed_config(tuned, world_size=1, total_steps=10)
    assert ds["optimizer"]["params"] == {"lr": 0.001, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.0,
                                             "torch_adam": True, "adam_w_mode": True}
    assert ds["scheduler"]["params"]["warmup_max_lr"] == 0.001 and ds["gradient_clipping"] == 0.5
    assert ds["fp16"] == {"enabled": True, "min_loss_scale": 1} and not ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match=r"train\.betas must be two numbers in \[0, 1\)"):
        load_config(3, overrides=["train.betas=[0.9]"])


def test_the_run_config_sets_exactly_the_deepspeed_keys_it_names():
    """``DEEPSPEED_KEYS`` (what a train.deepspeed_config file may not set) is what run_settings writes."""
    config = load_config(3, overrides=["train.offload_optimizer=true"])
    leaves, todo = [], [("", run_settings(config, world_size=1, total_steps=10))]
    while todo:
        prefix, section = todo.pop()
        for key, value in section.items():
            name = prefix + key
            if isinstance(value, dict) and name not in DEEPSPEED_KEYS:
                todo.append((name + ".", value))
            else:
                leaves.append(name)
    assert sorted(leaves) == sorted(DEEPSPEED_KEYS)


def test_a_deepspeed_file_adds_settings_and_may_not_set_the_run_configs(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text('{"zero_optimization": {"stage3_max_live_parameters": 1e8}, "steps_per_print": 10}')
    config = load_config(3, overrides=[f"train.deepspeed_config={extra}", "train.zero_stage=3"])
    ds = deepspeed_config(config, world_size=1, total_steps=10)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 1e8, "contiguous_gradients": True,
                                       "allgather_bucket_size": 500000000, "allgather_partitions": True}
    assert ds["steps_per_print"] == 10 and ds["optimizer"]["params"]["lr"] == 0.0005
    extra.write_text('{"optimizer": {"params": {"lr": 0.1, "eps": 1e-6}}, "gradient_clipping": 2}')
    with pytest.raises(ConfigError, match=r"sets gradient_clipping, optimizer\.params\.lr, optimizer\.params\.eps, "
                                          r"which the run config sets \(gradient_clipping: train\.gradient_clipping; "
                                          r"optimizer\.params\.lr: train\.learning_rate"):
        deepspeed_config(config, world_size=1, total_steps=10)


def test_held_out_tools_needs_a_test_split():
    assert load_config(3, [TINY_CONFIG], ["train.held_out_tools=true"]).train.held_out_tools
    for stage, overrides in [(3, ["data.eval_files=[]", "data.split.test_fraction=0"]), (1, [])]:
        with pytest.raises(ConfigError, match=r"train\.held_out_tools .* data\.eval_files or data\.split\.test_fraction"):
            load_config(stage, [TINY_CONFIG], ["train.held_out_tools=true", *overrides])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key train\.epoch;.*epochs"):
        load_config(3, overrides=["train.epoch=2"])
    with pytest.raises(ConfigError, match=r"unknown config key model\.lora\.rank"):
        load_config(3, overrides=["model.lora.rank=8"])


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int"):
        load_config(3, overrides=["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"model\.tuning: 'qlora' is not one of"):
        load_config(3, overrides=["model.tuning=qlora"])
    with pytest.raises(ConfigError, match=r"train\.length_group_batches must be at least 1, got 0"):
        load_config(3, overrides=["train.length_group_batches=0"])
    with pytest.raises(ConfigError, match=r"inference\.max_batch_tokens must be at least 1 \(or null: no cap\), got 0"):
        load_config(3, overrides=["inference.max_batch_tokens=0"])
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(3, overrides=["train.epochs"])


def test_bad_batch_arithmetic_says_what_to_change():
    config = load_config(3, overrides=["train.train_batch_size=64"])
    assert check_batch_arithmetic(config, world_size=4) == 64
    with pytest.raises(ConfigError, match=r"train_batch_size=64 but .* = 16\. Set train\.train_batch_size=16.*gradient_accumulation_steps to 16"):
        check_batch_arithmetic(config, world_size=1)


def test_missing_checkpoint_paths_are_listed(tmp_path):
    config = load_config(3, overrides=[f"model.llm_path={tmp_path}/nope", f"model.imagebind_path={tmp_path}/ib.pth"])
    with pytest.raises(ConfigError) as err:
        check_paths(config)
    message = str(err.value)
    assert "model.llm_path" in message and "no config.json" in message and "pretrained_checkpoint/README.md" in message
    assert "model.imagebind_path" in message and "data.train_files[0].path" in message


def test_too_few_examples_for_one_step():
    config = load_config(3, [TINY_CONFIG], ["train.micro_batch_size=4", "train.gradient_accumulation_steps=8", "train.epochs=3"])
    with pytest.raises(ConfigError, match="no full optimizer step"):
        planned_steps(10, config, world_size=1)
    assert planned_steps(64, config, world_size=1) == 2 * 3  # 16 micro-batches / 8 per step × 3 epochs


def test_stage_configs_and_partial_sections_keep_their_defaults():
    one, two = load_config(1), load_config(2)
    assert one.model.outputs.enabled and one.data.caption_prompt == "generate a caption"
    assert [f.modality for f in one.data.caption_files] == ["image", "video", "audio"]
    assert two.train.init_from == "ckpt/stage_1/final" and two.train.epochs == 1
    outputs = two.model.outputs
    assert [(o.signal_tokens, o.target_tokens, o.target_dim) for o in (outputs.image, outputs.video, outputs.audio)] == \
        [(4, 77, 768), (24, 77, 1024), (8, 1, 512)]
    # A layer naming one key of model.outputs.video keeps the video defaults (not the class's image ones).
    chain = load_config(2, [TINY_CONFIG, CONFIG_DIR / "tiny_chain.yaml"])
    assert (chain.model.outputs.video.signal_tokens, chain.model.outputs.video.target_dim) == (24, 1024)
    assert chain.model.outputs.video.decoder_path.endswith("tiny_zeroscope")
    full = load_config(3, [CONFIG_DIR / "any_to_any.yaml"])
    assert full.model.outputs.video.loss_scale == 2.0 and full.model.outputs.image.loss_scale == 1.0
    assert full.train.init_from == "ckpt/stage_2/final" and len(full.data.instruction_files) == 6
    assert (full.model.outputs.projector.hidden_size, full.model.outputs.projector.encoder_layers) == (512, 4)
    with pytest.raises(ConfigError, match="stage 1 needs the signal tokens"):
        load_config(1, overrides=["model.outputs.enabled=false"])


def test_outputs_sections_follow_the_output_modality_registry():
    from typing import get_type_hints

    from toollmm.config import OutputModalityConfig, OutputsConfig
    from toollmm.output_modalities import OUTPUT_MODALITIES

    sections = [name for name, hint in get_type_hints(OutputsConfig).items() if hint is OutputModalityConfig]
    assert sections == list(OUTPUT_MODALITIES) == ["image", "video", "audio"]
    outputs = load_config(3).model.outputs
    for name, entry in OUTPUT_MODALITIES.items():
        section = outputs.modality(name)
        assert (section.signal_tokens, section.target_tokens, section.target_dim, section.decoder_path) == \
            (entry.signal_tokens, entry.target_tokens, entry.target_dim, entry.decoder_path)
    assert [outputs.target_shape(m) for m in OUTPUT_MODALITIES] == [(77, 768), (77, 1024), (512,)]
    with pytest.raises(ConfigError, match=r"model\.outputs\.audio\.target_tokens must be 1: the audio decoder "
                                          r"\(AudioLDMPipeline\) is conditioned on one 512-d vector, got 77"):
        load_config(3, overrides=["model.outputs.audio.target_tokens=77"])
    with pytest.raises(ConfigError, match=r"model\.outputs\.video\.signal_tokens must be at least 1, got 0"):
        load_config(3, overrides=["model.outputs.video.signal_tokens=0"])
    with pytest.raises(ConfigError, match=r"model\.outputs\.image\.loss_scale must be at least 0, got -1\.0"):
        load_config(3, overrides=["model.outputs.image.loss_scale=-1"])


def test_offload_and_packing_keys():
    config = load_config(3, overrides=["train.offload_optimizer=true", "train.packing=true", "train.pack_length=512"])
    ds = deepspeed_config(config, world_size=1, total_steps=10)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "torch_adam" not in ds["optimizer"]["params"]  # DeepSpeedCPUAdam steps offloaded states
    assert config.train.packing and config.train.pack_length == 512
    plain = deepspeed_config(load_config(3), world_size=1, total_steps=10)
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["optimizer"]["params"]["torch_adam"]


def test_inference_overrides_change_the_inference_settings_only():
    config = load_config(3, [TINY_CONFIG])
    updated = apply_inference_overrides(config, ["inference.batch_size=8", "inference.top_k=5", "inference.num_beams=5",
                                                 "model.llm_path=/elsewhere/llm"])
    assert (updated.inference.batch_size, updated.inference.top_k, updated.inference.num_beams) == (8, 5, 5)
    assert updated.model.llm_path == "/elsewhere/llm" and updated.train == config.train
    assert config.inference.batch_size == 64 and config.inference.top_k == 1  # the checkpoint's config is left as it was
    refusals = {
        "inference.batchsize=8": r"^unknown config key inference.batchsize; allowed here: attn_implementation, batch_size, cache, catalogue_tools, chat_max_new_tokens",
        "model.dtype=fp16": r"^override model.dtype: inference takes inference.<key>=VALUE and model.llm_path=DIR",
        "inference.batch_size=0": r"^inference.batch_size must be at least 1, got 0",
        "inference.top_k_method=greedy": r"^inference.top_k_method: 'greedy' is not one of \['beam', 'exact'\]",
        "inference.num_beams=4": r"^inference.num_beams applies to inference.top_k > 1 with inference.top_k_method=beam",
        "inference.top_k": r"^override 'inference.top_k' must look like key.subkey=value",
    }
    for override, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            apply_inference_overrides(config, [override])
    with pytest.raises(ConfigError, match=r"^inference.num_beams=2 cannot return 5 tools: set inference.num_beams=5 or more"):
        apply_inference_overrides(config, ["inference.top_k=5", "inference.num_beams=2"])


def test_every_config_key_has_a_one_line_docstring():
    """A field added without its docstring (or with a paragraph instead of a line) fails here;
    data file entries (lists of DataFile / CaptionFile) count as keys too."""
    rows = [(key, doc) for key, doc, _ in config_keys()]
    rows += [(f"{cls.__name__}.{f.name}", field_docs(cls).get(f.name, ""))
             for cls in (DataFile, CaptionFile) for f in dataclasses.fields(cls)]
    assert {"model.lora.r", "data.media_limits.max_video_pixels", "inference.top_k", "DataFile.path"} <= set(dict(rows))
    bad = [f"{key}: {doc!r}" for key, doc in rows if not doc.strip() or "\n" in doc or len(doc) > 110]
    assert not bad, "config fields need a one-line docstring of at most 110 characters:\n" + "\n".join(bad)


def test_help_lists_the_keys_each_command_accepts(capsys):
    from toollmm.cli import inference, train

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    train_help = capsys.readouterr().out
    for key, doc, _ in config_keys():
        assert f"\n  {key}=" in train_help and doc in train_help, key
    # defaults come from each section's own values, not its class's: video's run is 24 tokens
    assert "\n  model.outputs.video.signal_tokens=24  " in train_help
    assert "\n  model.lora.target_modules=null  " in train_help and "\n  train.betas=[0.9, 0.95]  " in train_help

    with pytest.raises(SystemExit):
        inference.parse_args(["--help"])
    listed = re.findall(r"^  ([a-z_.]+)=", capsys.readouterr().out, flags=re.M)
    assert "inference.top_k" in listed and "model.llm_path" in listed
    assert listed == [key for key, _, _ in config_keys() if key.startswith(INFERENCE_OVERRIDES)]
