"""The open-set tool retriever: its features, training on seen tools only, its file round trip,
what it reaches among held-out tools on the bundled split, and open-set slots in inference."""

import json

import pytest
import torch

from conftest import DATA, TINY_CONFIG, TINY_LLM
from toollmm.catalogue import ToolEntry, write_tool_entries
from toollmm.checkpoint import save_checkpoint
from toollmm.cli import inference
from toollmm.cli.train_retriever import main as train_retriever_cli
from toollmm.config import ConfigError, load_config
from toollmm.data import load_splits
from toollmm.model.toollmm import build_model
from toollmm.open_set import query_groups, rank_by_text, recall_by_group
from toollmm.tokenization import load_tokenizer
from toollmm.tool_retriever import RetrieverSettings, ToolRetriever, entry_features, query_features, train_retriever

OPEN = ["data.split.unseen_tools=0.2"]


def test_features_of_a_request_and_an_entry():
    assert query_features("Which command, please?") == [
        "w:which", "w:command", "w:please", "p:which_command", "p:command_please",
        "q:<whi", "q:whic", "q:hich", "q:ich>",
        "q:<com", "q:comm", "q:omma", "q:mman", "q:mand", "q:and>",
        "q:<ple", "q:plea", "q:leas", "q:ease", "q:ase>"]
    entry = ToolEntry("superb/hubert-ks", task="Keyword spotting", tags=("audio",), examples=("never used",))
    assert entry_features(entry) == [
        "n:superb", "n:hubert", "n:ks",
        "c:<sup", "c:supe", "c:uper", "c:perb", "c:erb>",
        "c:<hub", "c:hube", "c:uber", "c:bert", "c:ert>",
        "c:<ks>",  # a word shorter than a 4-gram is one feature
        "t:keyword", "t:spotting", "t:audio"]


@pytest.fixture(scope="module")
def open_splits():
    return load_splits(load_config(3, [str(TINY_CONFIG)], OPEN).data)


@pytest.fixture(scope="module")
def retriever(open_splits):
    # 2 members, not the default 5: the member path at under half the training time.
    return train_retriever(open_splits.train, [ToolEntry(n) for n in open_splits.catalogue], RetrieverSettings(members=2))


def test_a_score_is_the_mean_of_the_members_cosines(retriever):
    texts, entries = ["transcribe this speech", "draw a cat"], [ToolEntry("openai/whisper-base"), ToolEntry("acme/new-tool")]
    queries, tools = retriever.encode_queries(texts), retriever.encode_entries(entries)
    assert queries.shape == (2, 2, 64) and torch.allclose(queries.norm(dim=-1), torch.ones(2, 2))
    per_member = [[[float(queries[q, m] @ tools[e, m]) for e in range(2)] for q in range(2)] for m in range(2)]
    assert torch.allclose(retriever.scores(texts, entries), torch.tensor(per_member).mean(0), atol=1e-6)
    assert not torch.allclose(torch.tensor(per_member[0]), torch.tensor(per_member[1]))  # initialised apart
    # A name and a request with no feature the retriever knows score 0 with everything, not an error.
    unknown = retriever.scores(["transcribe this speech", "ʘʘ"], [ToolEntry("ʘʘ/ʘʘ"), ToolEntry("openai/whisper-base")])
    assert unknown[:, 0].tolist() == [0.0, 0.0] and unknown[1].tolist() == [0.0, 0.0]


def test_retriever_learns_from_trained_tools_only_and_round_trips(open_splits, retriever, tmp_path):
    assert retriever.trained_tools == set(open_splits.catalogue_of("trained"))
    assert not retriever.trained_tools & open_splits.unseen_tools
    # Entry features come from trained tools' entries alone: a feature only an unseen name has is unknown.
    trained_features = {f for name in retriever.trained_tools for f in entry_features(ToolEntry(name))}
    assert set(retriever.entry_vocab) == trained_features
    retriever.save(tmp_path / "r")
    loaded = ToolRetriever.load(tmp_path / "r")
    texts, entries = ["transcribe this speech", "draw a cat"], [ToolEntry(n) for n in open_splits.catalogue[:50]]
    assert torch.equal(loaded.scores(texts, entries), retriever.scores(texts, entries))
    assert loaded.trained_tools == retriever.trained_tools
    with pytest.raises(FileNotFoundError, match=r"holds no tool retriever .*train_retriever.py --ckpt"):
        ToolRetriever.load(tmp_path / "absent")
    weights = (tmp_path / "r" / "tool_retriever.safetensors").read_bytes()
    (tmp_path / "r" / "tool_retriever.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"tool_retriever.safetensors is truncated, corrupt .*retrain it"):
        ToolRetriever.load(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "tool_retriever.json").read_text())
    (tmp_path / "r" / "tool_retriever.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(ValueError, match=r"not a readable tool retriever \(ValueError: format 1, this code reads 2\); retrain"):
        ToolRetriever.load(tmp_path / "r")
    (tmp_path / "r" / "tool_retriever.json").write_text('{"format": 2, "dim": 64')
    with pytest.raises(ValueError, match=r"tool_retriever.json is not a readable tool retriever \(JSONDecodeError"):
        ToolRetriever.load(tmp_path / "r")


def test_retriever_reaches_held_out_tools_where_text_matching_does_not(open_splits, retriever):
    """On the 114 test requests whose every tool was held out, the retriever's top 5 among the
    tools without a training row holds an acceptable tool far more often than chance (5 of 195)
    and than TF-IDF over the same tools."""
    queries = [q for q in open_splits.test_queries() if open_splits.tool_split(q) == "unseen"]
    new = [ToolEntry(n) for n in open_splits.catalogue if n not in retriever.trained_tools]
    assert len(queries) == 114 and len(new) == 195
    groups = [query_groups("unseen", q.input_modality) for q in queries]
    learned = recall_by_group([[t["tool"] for t in top] for top in retriever.rank_new_tools([q.query for q in queries], new, 5)],
                              [q.tools for q in queries], groups)["all"]["recall@5"]
    text = recall_by_group(rank_by_text(new, [q.query for q in queries]), [q.tools for q in queries], groups)["all"]["recall@5"]
    assert learned > 0.2 and learned > text + 0.1


def test_open_set_slots_need_fewer_slots_than_top_k():
    with pytest.raises(ConfigError, match=r"open_set_slots=5 must be between 1 and inference.top_k - 1 \(top_k is 5"):
        load_config(3, [str(TINY_CONFIG)], ["inference.top_k=5", "inference.open_set_slots=5"])


def test_inference_fills_the_last_slots_with_new_tools_from_the_retriever(open_splits, retriever, tmp_path):
    """A random-init checkpoint with the retriever beside it: the model ranks the first places,
    the retriever fills the last with tools the model never trained on, a new catalogue entry
    among them with no retraining; a checkpoint without a retriever is refused before decoding."""
    config = load_config(3, [str(TINY_CONFIG)], [f"model.llm_path={TINY_LLM}", "model.dtype=fp32", *OPEN])
    config.data.feature_cache_dir = str(tmp_path / "features")
    torch.manual_seed(0)
    ckpt = tmp_path / "ck"
    save_checkpoint(ckpt, build_model(config.model, 1024).eval(), config, load_tokenizer(TINY_LLM), {"step": 1}, "encoder-id")
    rows = [row for row in json.loads((DATA / "toolmmbench" / "combined_data.json").read_text())
            if "MIT/ast-finetuned-speech-commands-v2" in row["conversations"][1]["value"]][:3]
    (tmp_path / "queries.json").write_text(json.dumps(rows))
    args = ["--ckpt", str(ckpt), "--data", str(tmp_path / "queries.json"), "--output", str(tmp_path / "top.json"),
            "inference.constrained=true", "inference.top_k=4", "inference.open_set_slots=2", "inference.max_new_tokens=4"]
    with pytest.raises(SystemExit, match=r"inference: .*holds no tool retriever"):
        inference.main(args)
    retriever.save(ckpt / "tool_retriever")
    trained = sorted(retriever.trained_tools)[:20]
    new = ["acme/speech-commands-keyword-spotting", "acme/text-to-image-diffusion"]
    write_tool_entries(tmp_path / "tools.jsonl", [ToolEntry(n) for n in trained + new])
    inference.main([*args, "--catalogue", str(tmp_path / "tools.jsonl")])
    answers = json.loads((tmp_path / "top.json").read_text())
    assert len(answers) == 3
    for answer in answers:
        model_part, retrieved = answer["top_k"][:2], answer["top_k"][2:]
        assert all("ranked_by" not in r for r in model_part)
        assert [r["ranked_by"] for r in retrieved] == ["retriever"] * len(retrieved)
        assert {r["tool"] for r in retrieved} <= set(new) and len(answer["top_k"]) == len({r["tool"] for r in answer["top_k"]})
        assert set(new) <= {r["tool"] for r in answer["top_k"]}  # both new tools: one of the two slots or the model's
        assert answer["tool"] in trained + new
    # Requests to recognise a spoken command: the speech-commands tool is the retriever's first pick.
    firsts = [next(r["tool"] for r in a["top_k"] if r.get("ranked_by")) for a in answers if len(a["top_k"]) > 2]
    assert firsts and all(tool == new[0] for tool in firsts)


def test_train_retriever_cli_writes_beside_the_checkpoint_and_reports_recall(tmp_path):
    config = load_config(3, [str(TINY_CONFIG)], [f"model.llm_path={TINY_LLM}", "model.dtype=fp32", *OPEN])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", build_model(config.model, 1024).eval(), config, load_tokenizer(TINY_LLM), {"step": 1}, "e")
    output = train_retriever_cli(["--ckpt", str(tmp_path / "ck"), "--epochs", "2", "--members", "1"])
    assert output == tmp_path / "ck" / "tool_retriever"
    recall = json.loads((output / "test_recall.json").read_text())
    assert recall["unseen"]["queries"] == 114 and recall["seen"]["queries"] == 376
    assert ToolRetriever.load(output).trained_tools == set(load_splits(config.data).catalogue_of("trained"))
    with pytest.raises(SystemExit, match=r"train_retriever: .* is not a Tool_LMM checkpoint"):
        train_retriever_cli(["--ckpt", str(tmp_path / "nothing")])
