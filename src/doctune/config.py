"""doctune.yaml: the contract between stages. One pydantic class per section, every field described.

`load_config(path, overrides)` reads the file, applies `key.sub=value` overrides from the command line and
validates everything before any work starts. Every problem becomes one line naming the key, the value and
what is allowed (`ConfigError.problems`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from doctune.errors import ConfigError
from doctune.runs import RunDir

DEFAULT_CONFIG_NAME = "doctune.yaml"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_off(cls, data: Any) -> Any:
        """YAML reads an unquoted `off` as false: where "off" is one of a field's choices, false means "off"."""
        if isinstance(data, dict):
            fixed = {name: "off" for name in _fields_with_off(cls) if data.get(name) is False}
            if fixed:
                data = {**data, **fixed}
        return data


def _fields_with_off(model: type[BaseModel]) -> list[str]:
    """Names of `model`'s fields whose allowed values include the text "off"."""

    def allows_off(annotation: Any) -> bool:
        return annotation == "off" or any(allows_off(arg) for arg in get_args(annotation))

    return [name for name, field in model.model_fields.items() if allows_off(field.annotation)]


class DataConfig(Section):
    dir: str = Field(
        "data", description="Folder of documents (.pdf, .md, .markdown, .txt), read recursively."
    )
    chunk_tokens: int = Field(1024, ge=16, description="Largest chunk, in tokens of the counting tokenizer.")
    chunk_overlap: int = Field(64, ge=0, description="Tokens shared by consecutive chunks of one document.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer (local dir or hub name) that counts chunk tokens; null: the teacher's when it is "
        "an hf model, else chars/4.",
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> DataConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        return self


class ModelConfig(Section):
    backend: Literal["openai", "hf"] = Field(
        "openai",
        description="openai: any OpenAI-compatible server (vLLM, TGI, ...); hf: in-process transformers.",
    )
    model: str = Field(
        description="Model name on the server (openai); hf: a local folder, a .gguf file or a hub name."
    )
    base_url: str | list[str] | None = Field(
        None, description="openai: server URL(s) ending in /v1; several are used round-robin."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="openai: env var holding the API key (the key itself never goes in files).",
    )
    max_concurrency: int = Field(
        64, ge=1, description="Requests in flight at once (openai) / batch size (hf)."
    )
    requests_per_minute: float | None = Field(
        None, gt=0, description="openai: request rate limit; null: none."
    )
    tokens_per_minute: float | None = Field(None, gt=0, description="openai: token rate limit; null: none.")
    timeout: float = Field(
        120.0,
        gt=0,
        description="openai: seconds with nothing from the server before a request is abandoned and retried; "
        "with stream: true an answer that keeps coming is never cut, with stream: false it bounds the whole answer.",
    )
    stream: bool = Field(
        True,
        description="openai: stream answers, so a slow server that keeps writing is waited for; false: whole "
        "answers (about half the client CPU per request: for a fast server at hundreds of requests/s).",
    )
    max_retries: int = Field(
        6, ge=0, description="openai: retries on 429/5xx/timeouts, with jittered backoff."
    )
    structured_output: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema",
        description="How a JSON schema is sent: response_format json_schema, json_object, or not.",
    )
    adapter: str | None = Field(None, description="hf: PEFT adapter dir loaded on top of the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="hf: weights dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="hf: torch device; auto: cuda when available, else cpu.")


def _default_models() -> dict[str, ModelConfig]:
    return {
        "teacher": ModelConfig(
            backend="openai",
            base_url="http://localhost:8001/v1",
            model="meta-llama/Meta-Llama-3-70B-Instruct",
        ),
        "judge": ModelConfig(
            backend="openai",
            base_url="http://localhost:8001/v1",
            model="meta-llama/Meta-Llama-3-70B-Instruct",
        ),
        "student": ModelConfig(backend="hf", model="meta-llama/Meta-Llama-3-8B-Instruct"),
    }


class GenerateConfig(Section):
    model: str = Field("teacher", description="Name in `models:` of the model that writes QA pairs.")
    total_questions: int = Field(
        7000, ge=1, description="Questions asked over all chunks (spread by tokens)."
    )
    language: str = Field("English", description="Language of the generated questions and answers.")
    max_tokens: int = Field(2048, ge=1, description="Largest reply per request.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of the teacher.")
    prompts: str | None = Field(
        None, description="YAML with question_prompt_template (seed format); null: the packaged prompts."
    )
    max_failure_rate: float = Field(
        0.1, ge=0, le=1, description="Share of failed requests above which the stage exits non-zero."
    )


class DedupConfig(Section):
    near: float | None = Field(
        0.85, gt=0, le=1, description="MinHash Jaccard threshold for near-duplicate questions; null: off."
    )
    semantic: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cosine threshold on MiniLM embeddings for semantic duplicates; null: off.",
    )


class CurateConfig(Section):
    model: str = Field("judge", description="Name in `models:` of the judge.")
    mode: Literal["score", "yesno", "off"] = Field(
        "score", description="score: 1-5 grounding score; yesno: the seed's YES/NO judge; off: no judge."
    )
    threshold: int = Field(4, ge=1, le=5, description="score mode: keep pairs scored at least this.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicate question removal.")
    eval_set: str | None = Field(
        None, description="Eval set whose questions must not leak into training (contamination guard)."
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of source chunks whose pairs go to val.")
    system_prompt: str = Field(
        "You are a helpful assistant for questions about the documents you were trained on.",
        description="System message of every training conversation (also used by eval, chat and serve).",
    )
    seed: int = Field(0, description="Seed of the train/val split.")
    max_answer_chars: int = Field(2000, ge=1, description="Answers longer than this are rejected.")
    prompts: str | None = Field(
        None, description="YAML with curation_prompt_template; null: packaged prompts."
    )
    max_failure_rate: float = Field(
        0.1, ge=0, le=1, description="Share of judge errors that fails the stage."
    )
    extra_pairs: str | list[str] | None = Field(
        None,
        description="Your own QA pairs (one file or a list): data.json format, JSONL or CSV with question "
        "and answer columns; curated like generated pairs (no judge), kept for training only.",
    )


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: all-linear or a list of module names."
    )


class FinetuneConfig(Section):
    model: str = Field("student", description="Name in `models:` of the student (an hf model).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter shape.")
    epochs: float = Field(3, gt=0, description="Passes over train.jsonl.")
    batch_size: int = Field(4, ge=1, description="Samples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated before an update.")
    lr: float = Field(1.0e-4, gt=0, description="Peak learning rate.")
    max_length: int = Field(2048, ge=8, description="Samples longer than this (tokens) are truncated.")
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA via bitsandbytes (CUDA only)."
    )
    packing: bool = Field(False, description="Pack samples into rows without cross-sample attention.")
    fsdp: Literal["full_shard"] | None = Field(
        None, description="FSDP through accelerate (CUDA only); null: DDP."
    )
    eval_steps: int = Field(50, ge=1, description="Validation loss every this many steps (and at the end).")
    select: Literal["val_loss", "last"] = Field(
        "val_loss",
        description="Adapter in the output dir: val_loss: lowest val loss (the last in last/); last: the last "
        "step (the lowest-val-loss one in best/).",
    )
    seed: int = Field(42, description="Seed of initialisation and data order.")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Loggers: tensorboard, wandb, or none."
    )


class CandidateConfig(Section):
    model: str = Field(description="Name in `models:` of the model that answers.")
    adapter: str | None = Field(
        None, description="hf: adapter dir on top of the model; {run_dir} is replaced."
    )


def _default_candidates() -> dict[str, CandidateConfig]:
    return {
        "finetuned": CandidateConfig(model="student", adapter="{run_dir}/adapter"),
        "base": CandidateConfig(model="student"),
    }


class EvalConfig(Section):
    eval_set: str = Field("eval_set.json", description='Held-out set [{"question", "answer"}] (seed format).')
    judge: str | None = Field("judge", description="Name in `models:` of the judge; null: no LLM judge.")
    judge_mode: Literal["score", "yesno"] = Field(
        "score", description="score: reference-guided 1-10; yesno: the seed's YES/NO."
    )
    max_tokens: int = Field(256, ge=1, description="Largest answer per candidate.")
    temperature: float = Field(0.0, ge=0, le=2, description="Decoding temperature of the candidates.")
    candidates: dict[str, CandidateConfig] = Field(
        default_factory=_default_candidates, description="Models compared side by side."
    )
    pairwise: list[str] | None = Field(None, description="Two candidate names judged head to head.")
    similarity: bool = Field(
        True,
        description="Score answers by MiniLM embedding similarity to the reference (costs CPU time; vectors are "
        "kept in `eval/embeddings.sqlite`, so a re-run embeds only new texts).",
    )
    prompts: str | None = Field(
        None, description="YAML with judge_prompt_template (seed format); null: packaged."
    )
    max_failure_rate: float = Field(
        0.1, ge=0, le=1, description="Share of failed items that fails the stage."
    )


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 keeps the server local.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")


class Config(Section):
    run_dir: str = Field("runs/my-chatbot", description="Folder of this run's files (never inside data.dir).")
    data: DataConfig = Field(default_factory=DataConfig, description="Documents and chunking.")
    models: dict[str, ModelConfig] = Field(default_factory=_default_models, description="Models by name.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="QA generation (teacher).")
    curate: CurateConfig = Field(
        default_factory=CurateConfig, description="Judge, dedup, contamination, split."
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="LoRA fine-tuning.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Side-by-side evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="OpenAI-compatible server.")

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the config are resolved against (the config file's folder)."""
        return self._base_dir

    def path(self, value: str | Path) -> Path:
        """Resolve a path from the config: `{run_dir}` is replaced, relative paths start at base_dir."""
        text = str(value)
        if "{run_dir}" in text:
            text = text.replace("{run_dir}", str(self.run_path))
        p = Path(text).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    @property
    def run_path(self) -> Path:
        p = Path(self.run_dir).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    @property
    def run_folder(self) -> RunDir:
        """The run folder with every file of it named (`cfg.run_folder.train`, `.adapter.config`, ...)."""
        return RunDir(self.run_path)

    def model(self, name: str) -> ModelConfig:
        return self.models[name]

    def model_source(self, value: str) -> str:
        """A model/tokenizer reference as transformers should load it: an existing local folder (relative
        paths start at base_dir, `{run_dir}` replaced) as an absolute path, anything else as a hub name."""
        local = self.path(value)
        return str(local) if local.exists() else value


MODEL_STAGES = ("generate", "curate", "finetune", "eval")  # the stages that name models in `models:`


def reference_problems(cfg: Config, stages: Iterable[str] | None = None) -> list[str]:
    """Model names that `stages` refer to but `models:` lacks, one line each. `stages` None: every stage (what
    `doctune run` needs); a command checks only its own stage, so a finetune-only config needs no teacher."""
    wanted = set(MODEL_STAGES if stages is None else stages)
    known = ", ".join(sorted(cfg.models)) or "(none)"
    refs: list[tuple[str, str | None]] = []
    if "generate" in wanted:
        refs.append(("generate.model", cfg.generate.model))
    if "curate" in wanted:
        refs.append(("curate.model", cfg.curate.model if cfg.curate.mode != "off" else None))
    if "finetune" in wanted:
        refs.append(("finetune.model", cfg.finetune.model))
    if "eval" in wanted:
        refs.append(("eval.judge", cfg.eval.judge))
        refs += [(f"eval.candidates.{n}.model", c.model) for n, c in cfg.eval.candidates.items()]
    problems = [
        f"{key}: {value!r} is not a model in `models:` (defined: {known})"
        for key, value in refs
        if value is not None and value not in cfg.models
    ]
    if "eval" in wanted and cfg.eval.pairwise is not None:
        if len(cfg.eval.pairwise) != 2:
            problems.append(f"eval.pairwise: {cfg.eval.pairwise!r} must name exactly two candidates")
        for name in cfg.eval.pairwise:
            if name not in cfg.eval.candidates:
                problems.append(
                    f"eval.pairwise: {name!r} is not a candidate (candidates: {', '.join(cfg.eval.candidates)})"
                )
    finetune_model = cfg.models.get(cfg.finetune.model)
    if "finetune" in wanted and finetune_model is not None and finetune_model.backend != "hf":
        problems.append(f"finetune.model: {cfg.finetune.model!r} must be an hf model to be fine-tuned")
    return problems


def _key_part(part: Any) -> str:
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text else repr(part)


def _describe_error(err: dict[str, Any]) -> str:
    key = ".".join(_key_part(part) for part in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; `doctune init` writes every allowed key)"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{key}: got {shown}: {err['msg']}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["generate.total_questions=100"]` → `{"generate.total_questions": 100}` (values parsed as YAML).

    >>> parse_overrides(["curate.mode=yesno", "data.chunk_tokens=256"])
    {'curate.mode': 'yesno', 'data.chunk_tokens': 256}
    """
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. generate.total_questions=100")
            continue
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    if problems:
        raise ConfigError(problems, source="command line")
    return out


def _apply_override(raw: dict[str, Any], dotted: str, value: Any) -> str | None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"{'.'.join(map(_key_part, parts[: i + 1]))}: is {child!r}, cannot set {_key_part(dotted)}"
        node = child
    node[parts[-1]] = value
    return None


def build_config(
    raw: Any,
    base_dir: Path,
    overrides: dict[str, Any] | None = None,
    source: str = "config",
    stages: Iterable[str] | None = None,
) -> Config:
    """Validate a parsed YAML document (plus overrides) into a Config, or raise ConfigError with every problem.
    `stages`: check only the model references of these stages (None: all, see `reference_problems`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): got {type(raw).__name__}, expected a mapping of sections"], source)
    raw = _deep_copy(raw)
    overrides = overrides or {}
    problems = [p for k, v in overrides.items() if (p := _apply_override(raw, k, v))]
    if problems:
        raise ConfigError(problems, COMMAND_LINE)
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError([f"{_key_part(k)}: keys must be text" for k in bad_keys], source)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise _config_error([_describe_error(e) for e in exc.errors()], overrides, source) from None
    cfg._base_dir = base_dir.resolve()
    problems = reference_problems(cfg, stages)
    if problems:
        raise _config_error(problems, overrides, source)
    return cfg


COMMAND_LINE = "command line"


def _config_error(problems: list[str], overrides: dict[str, Any], source: str) -> ConfigError:
    """ConfigError for `problems`, the lines about a key set on the command line (--set or an option) marked
    as such, so that the user does not look for the value in the file."""
    marked = []
    for problem in problems:
        key, sep, rest = problem.partition(":")
        if sep and any(key == k or key.startswith(k + ".") for k in overrides):
            problem = f"{key} (set on the command line):{rest}"
        marked.append(problem)
    from_cli = all("(set on the command line):" in p for p in marked)
    return ConfigError(marked, COMMAND_LINE if from_cli else source)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (not the last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            seen.setdefault(key, key_node.start_mark.line + 1)
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first}); keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """`yaml.safe_load`, but a duplicate key raises yaml.YAMLError naming the key and both lines."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    stages: Iterable[str] | None = None,
) -> Config:
    """Read doctune.yaml (default ./doctune.yaml), apply overrides, validate. Raises ConfigError.
    `stages`: check only the model references of these stages (None: all)."""
    path = Path(path) if path is not None else Path(DEFAULT_CONFIG_NAME)
    if path.is_dir():
        if not (path / DEFAULT_CONFIG_NAME).is_file():
            raise ConfigError(
                [f"{path}: is a folder, give the {DEFAULT_CONFIG_NAME} file (-c/--config PATH)"],
                source=str(path),
            )
        path = path / DEFAULT_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            [f"{path}: no such file (write one with `doctune init`, or pass -c/--config PATH)"],
            source=str(path),
        )
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"not valid YAML{at}: {reason}"], source=str(path)) from None
    return build_config(raw, path.parent, overrides, source=str(path), stages=stages)


# ---------------------------------------------------------------- `doctune init`: defaults with comments


def _yaml_scalar(value: Any) -> str:
    dumped = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return dumped.removesuffix("\n...").removesuffix("...").strip()


def _render_section(model: BaseModel, indent: int) -> list[str]:
    lines: list[str] = []
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines += _render_section(value, indent + 1)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            lines.append(f"{pad}{name}:")
            for key, sub in value.items():
                lines.append(f"{pad}  {key}:")
                lines += _render_section(sub, indent + 2)
        else:
            lines.append(f"{pad}{name}: {_yaml_scalar(value)}")
    return lines


def default_config_yaml() -> str:
    """doctune.yaml with every default and its description as a comment (what `doctune init` writes)."""
    header = [
        "# doctune configuration: every key with its default. Relative paths start at this file's folder.",
        "# Every command validates it first; override a field with --set KEY=VALUE, e.g. --set data.chunk_tokens=512",
    ]
    return "\n".join(header + _render_section(Config(), 0)) + "\n"


def reference_markdown() -> str:
    """The configuration reference table for the README, generated from the models."""
    rows = ["| key | default | description |", "|---|---|---|"]

    def walk(model_cls: type[BaseModel], prefix: str) -> None:
        for name, field in model_cls.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            if field.is_required():
                default = "(required)"
            elif name in ("models", "candidates"):
                default = "see `doctune init`"
            else:
                default = _yaml_scalar(field.get_default(call_default_factory=True))
            rows.append(f"| `{key}` | `{default}` | {field.description or ''} |")

    walk(Config, "")
    walk(ModelConfig, "models.NAME.")
    walk(CandidateConfig, "eval.candidates.NAME.")
    return "\n".join(rows) + "\n"
