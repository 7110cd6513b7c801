"""A clone stands on its own: nothing outside the repository is read, configs ship with the
package, a plain (non-editable) install trains from another folder, and optional parts name
their extra when missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import CONFIGS, DATA, ROOT, TINY_CONFIG

# Built from pieces so that this file does not match itself.
OUTSIDE_FOLDER = re.compile("|".join([r"\.\./" + "shared", "shared" + r"/(data|device|hooks)\b",
                                      "TOOLLMM_" + "SHARED_DATA", r"\." + "devdata"]))
# Words about how the project was made, not about what it does; and machine nicknames.
PROCESS_WORDS = re.compile("|".join([r"\bsessions?\b", r"\bissue #?\d", r"\bdevice tool\b", r"\bhelpers?\b",
                                     r"\bthe team\b", r"\b(?:H100|H200) [A-Z]\b", r"\bmachines? [A-Z]\b"]), re.I)
USER_DOCS = ["README.md", "docs/*.md", "bench/README.md", "bench/results/**/*.md"]


def tracked_files() -> list[Path]:
    if (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    skip = {".git", ".venv", "pretrained_checkpoint", "ckpt", "__pycache__"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_no_tracked_file_reads_a_folder_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if path.suffix in {".jpg", ".png", ".wav", ".mp4", ".pth", ".safetensors"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_FOLDER.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "files that refer to a folder beside the clone:\n" + "\n".join(offenders)


def test_the_sample_data_is_bundled_with_its_licences():
    for name in ("audio_tx2t.json", "video_tx2t.json", "combined_data.json", "LICENSE"):
        assert (DATA / "toolmmbench" / name).is_file(), name
    assert (DATA / "t2x_pairs" / "LICENSE.md").is_file()
    rows = json.loads((DATA / "toolmmbench_sample" / "media_requests.json").read_text())
    media = [row[f"{row['input_modality']}_path"] for row in rows]
    assert len(rows) == 120 and all((DATA / path).is_file() for path in media)


def test_readme_is_short_and_docs_speak_to_users():
    assert (ROOT / "README.md").stat().st_size < 12_000
    found = []
    for pattern in USER_DOCS:
        for path in sorted(ROOT.glob(pattern)):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if match := PROCESS_WORDS.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_packaged_configs_are_found_by_name_and_paths_win():
    from toollmm.config import ConfigError, find_config_file, packaged_configs

    assert packaged_configs() == ["any_to_any", "small", "small_published", "tiny", "tiny_chain"]
    assert find_config_file("tiny") == find_config_file("tiny.yaml") == CONFIGS / "tiny.yaml"
    assert find_config_file(str(TINY_CONFIG)) == TINY_CONFIG
    with pytest.raises(ConfigError, match="config file tiniest does not exist .*packaged configs: any_to_any, small, small_published, tiny, tiny_chain"):
        find_config_file("tiniest")


@pytest.mark.parametrize("make", ["absent", "empty", "no_captions"])
def test_tiny_builder_names_a_missing_data_folder(tmp_path, make):
    data = tmp_path / "data"
    if make != "absent":
        data.mkdir()
    if make == "no_captions":
        (data / "toolmmbench").mkdir()
        (data / "toolmmbench" / "rows.json").write_text("[]")
    result = subprocess.run([sys.executable, "-m", "toollmm.tiny", "--root", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    expected = {"absent": f"the sample data folder {data} does not exist",
                "empty": f"{data / 'toolmmbench'} and {data / 't2x_pairs'} hold no .json files",
                "no_captions": f"{data / 't2x_pairs'} hold no .json files"}[make]
    assert message.startswith(f"toollmm-build-tiny: {expected}. ") and "git checkout -- data" in message
    assert not (tmp_path / "pretrained_checkpoint").exists()  # nothing built before the check


def test_missing_extras_are_named(monkeypatch, tmp_path):
    from toollmm.engine import MetricLogger
    from toollmm.evaluate import write_reports
    from toollmm.extras import MissingExtraError, require

    for module in ("diffusers", "matplotlib", "tensorboard", "gradio"):
        monkeypatch.setitem(sys.modules, module, None)  # import of a None entry fails: "not installed"
    with pytest.raises(MissingExtraError, match=r"the image decoder needs the diffusers package: pip install 'toollmm\[decoders\]'"):
        require("diffusers", "the image decoder")
    logger = MetricLogger(tmp_path, enabled=True)
    logger.log(1, {"loss": 2.5})
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n' and not (tmp_path / "tensorboard").exists()

    metrics = {"overall": {}, "by_modality": {}, "missing_predictions": 0, "breakdown_sources": {}}
    from toollmm import evaluate
    monkeypatch.setattr(evaluate, "format_table", lambda *a, **k: "table\n")
    monkeypatch.setattr(evaluate, "format_recall_table", lambda *a, **k: None)
    write_reports(metrics, tmp_path / "eval", "t")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json", "report.md"]
    assert "No chart: matplotlib is not installed (pip install 'toollmm[plots]'" in (tmp_path / "eval" / "report.md").read_text()


def test_demo_without_gradio_exits_naming_the_extra():
    code = "import sys; sys.modules['gradio'] = None; import toollmm.app"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("the demo needs the gradio package: pip install 'toollmm[demo]' "
                                     "(in a clone: pip install -e '.[demo]')")


def test_tiny_default_builds_without_the_decoders_extra(tmp_path):
    code = ("import sys, logging; sys.modules['diffusers'] = None; logging.basicConfig(level=logging.INFO);"
            "from pathlib import Path; from toollmm.tiny import build;"
            f"build(Path({str(tmp_path)!r}), Path({str(DATA)!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny decoders not built (stage 2 and generated media need them): pip install 'toollmm[decoders]'" in result.stderr
    assert (tmp_path / "pretrained_checkpoint" / "LLM_ckpt" / "tiny_llama" / "model.safetensors").is_file()
    assert not (tmp_path / "pretrained_checkpoint" / "diffusion_ckpt").exists()


SCRIPTS = ("train", "infer", "evaluate", "build-tiny", "build-small", "preprocess", "import-checkpoint", "extract-features",
           "app", "process-embeddings")
HELP_DRIVER = """
import contextlib, importlib, io, json, sys
from importlib.metadata import entry_points
import toollmm.config
found = {"config_dir": str(toollmm.config.CONFIG_DIR)}
for ep in entry_points(group="console_scripts"):
    if not ep.name.startswith("toollmm-") or ep.name in found:
        continue
    sys.argv, stdout, code = [ep.name, "--help"], io.StringIO(), None
    with contextlib.redirect_stdout(stdout):
        try:
            ep.load()()
        except SystemExit as exit:
            code = exit.code
    found[ep.name] = [code, stdout.getvalue(), importlib.import_module(ep.module).__file__]
print(json.dumps(found))
"""


@pytest.mark.slow
def test_plain_install_trains_from_another_folder(tiny_default, tmp_path):
    # A fresh venv with a non-editable install of this checkout. Its dependencies come from the
    # test environment through a .pth line (a multi-GB torch install per test run is not affordable):
    # the .pth adds that site-packages folder to sys.path, where the editable install's own .pth
    # is not processed, so toollmm can only come from the fresh install.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Without this process's rendezvous settings: a test that ran DeepSpeed in-process left
    # MASTER_PORT pointing at the store it still listens on.
    launcher = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TOOLLMM_ROOT", "VIRTUAL_ENV", *launcher)}
    # Where the configs come from, and every console script's --help, in one process of the fresh
    # venv (each script in a process of its own cost CI ~30 s of Python starts); the scripts
    # themselves are checked to exist.
    helped = json.loads(subprocess.run([str(python), "-c", HELP_DRIVER], cwd=elsewhere, capture_output=True, text=True,
                                       env=env, check=True, timeout=300).stdout)
    where = helped.pop("config_dir")
    assert where.startswith(site) and Path(where, "tiny.yaml").is_file() and Path(where, "base.yaml").is_file()
    assert set(helped) == {f"toollmm-{s}" for s in SCRIPTS} and all((venv / "bin" / name).is_file() for name in helped)
    for name, (code, stdout, module) in helped.items():
        assert code in (0, None) and stdout.startswith(f"usage: {name}"), (name, code, stdout[-2000:])
        assert module.startswith(site), (name, module)  # the fresh install's, not the checkout's
    train_help = " ".join(helped["toollmm-train"][1].split())
    assert "packaged config's name (any_to_any, small, small_published, tiny, tiny_chain)" in train_help

    # One epoch of the tiny config over the 120 bundled media rows, from another folder: the
    # checkpoints and data come from the clone through TOOLLMM_ROOT, the configs from the package.
    out = elsewhere / "run"
    sample = "[{path: data/toolmmbench_sample/media_requests.json, media_root: data}]"
    result = subprocess.run(
        [str(venv / "bin" / "toollmm-train"), "--stage", "3", "--config", "tiny", f"train.output_dir={out}", "train.epochs=1",
         f"data.train_files={sample}", "data.eval_files=[]", "data.split.test_fraction=0.2", "train.num_workers=0"],
        cwd=elsewhere, capture_output=True, text=True, timeout=900, env={**env, "TOOLLMM_ROOT": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 7  # the split's training share of the 120 rows, in micro-batches of 16
    assert (out / "final" / "trainable.safetensors").is_file()

