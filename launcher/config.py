"""The job config: typed sections, layered YAML < CLI overrides, validated once.

    job = load_config(["--config", "configs/cpu_tiny.yaml", "--moe.top_k=1"])
    layout = job.validate(world_size)   # raises ConfigError naming the values

Each section's schema lives beside the code that owns it (model/config.py, parallel/config.py,
trainer/config.py); this module composes them, parses values by their declared types,
rejects unknown keys by name, and checks what spans sections.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import ModelConfig, MoEConfig, check_expert_parallel
from model.errors import ConfigError
from parallel.config import ParallelConfig
from parallel.topology import Layout
from trainer.config import CheckpointConfig, DataConfig, LoggingConfig, TrainConfig

# grouped_mm needs 16-byte-aligned strides: 8 elements in bf16 (4 would do for fp32).
GROUPED_MM_ALIGN = 8


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        # The dotted keys the YAML file or the command line set (not a field: it is not part of
        # the resolved config). A model from an HF directory fills the keys left out of it.
        self.explicit: set[str] = set()

    def validate(self, world_size: int) -> Layout:
        """Check every section and what spans them; returns the parallel layout."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        m, moe, par, tr = self.model, self.moe, self.parallel, self.train
        layout = Layout.of(world_size, par.dp, par.tp, par.ep)
        for name, value in (("model.n_heads", m.n_heads), ("model.ffn_hidden", m.ffn_hidden),
                            ("moe.shared_expert_hidden", moe.shared_expert_hidden)):
            if value % par.tp:
                raise ConfigError(f"{name} ({value}) must be divisible by parallel.tp ({par.tp})")
        if m.kv_heads % par.tp:
            raise ConfigError(
                f"model.n_kv_heads ({m.kv_heads}) must be divisible by parallel.tp ({par.tp}): tp "
                f"splits the key/value heads as it splits model.n_heads ({m.n_heads})")
        beyond = [i for i in moe.dense_layers or [] if i >= m.n_layers]
        if beyond:
            raise ConfigError(f"moe.dense_layers ({moe.dense_layers}) names blocks {beyond} beyond "
                              f"model.n_layers ({m.n_layers})")
        if moe.backend in ("deepspeed", "megablocks") and par.tp > 1:
            raise ConfigError(
                f"moe.backend {moe.backend} runs with parallel.tp 1 only (got {par.tp}); use the "
                "native backend for tensor parallelism"
            )
        tokens = tr.micro_batch_size * tr.seq_len
        if tokens % par.tp:
            raise ConfigError(
                f"tokens per micro-batch, train.micro_batch_size x train.seq_len ({tokens}), must "
                f"be divisible by parallel.tp ({par.tp}): each tp rank dispatches 1/tp of them"
            )
        check_expert_parallel(moe.num_experts, par.ep)
        if tr.seq_len > m.max_seq_len:
            raise ConfigError(
                f"train.seq_len ({tr.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})"
            )
        # torch's grouped_mm, the native backend's: the other backends' kernels take any shape.
        if (moe.backend == "native" and moe.expert_impl == "grouped_mm"
                and (m.dim % GROUPED_MM_ALIGN or moe.expert_hidden % GROUPED_MM_ALIGN)):
            raise ConfigError(
                f"moe.expert_impl grouped_mm needs model.dim ({m.dim}) and moe.expert_hidden "
                f"({moe.expert_hidden}) to be multiples of {GROUPED_MM_ALIGN}; use "
                "moe.expert_impl=loop otherwise"
            )
        if self.data.source in ("stdlib", "text") and m.vocab_size < 256:
            raise ConfigError(
                f"data.source {self.data.source!r} is byte-level: model.vocab_size "
                f"({m.vocab_size}) must be >= 256"
            )
        return layout

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(argv: list[str]) -> JobConfig:
    """`--config FILE` (optional; of several, the last) then `--section.key=value` overrides,
    applied in order."""
    path, overrides = _split_args(argv)
    job = JobConfig()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _read_yaml(Path(path))
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _set(job, f"{section}.{key}", value, from_cli=False)
    for dotted, raw in overrides:
        _set(job, dotted, raw, from_cli=True)
    return job


def _read_yaml(path: Path) -> dict:
    """The config file's sections; a file that is not YAML, or holds nothing, is refused."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty: give sections (model:, train:, ...) "
                          "or leave out --config for every default")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, not {type(data).__name__}")
    return data


def _split_args(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --moe.top_k=2")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value" + (f", not the flag {argv[i + 1]}"
                                                            if i + 1 < len(argv) else ""))
            value, i = argv[i + 1], i + 1
        if key == "config":  # the last one wins: a template's default, then the user's
            path = value
        else:
            overrides.append((key, value))
        i += 1
    return path, overrides


def _set(job: JobConfig, dotted: str, value: Any, from_cli: bool) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name: f for f in dataclasses.fields(job)}
    if section_name not in sections or not key:
        raise ConfigError(f"unknown config key {dotted!r}{_suggest(section_name, sections)}")
    section = getattr(job, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, hints, section_name + '.')}")
    setattr(section, key, _coerce(dotted, value, hints[key], from_cli))
    job.explicit.add(dotted)


def _suggest(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known: {', '.join(known)}"


_KIND = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}


def _coerce(dotted: str, value: Any, hint: Any, from_cli: bool) -> Any:
    """Check (YAML) or parse (CLI string) `value` against the field's declared type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if from_cli and isinstance(value, str) and value.lower() in ("null", "none"):
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{dotted} must be {_kind(base)}, got null")
    if typing.get_origin(base) is list:
        return _coerce_list(dotted, value, typing.get_args(base)[0], from_cli)
    if from_cli and isinstance(value, str) and base is not str:
        value = _parse_cli(dotted, value, base)
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-3" as a string
            number = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):  # nan or inf would train on, silently, or fail late
                raise ConfigError(f"{dotted} must be a finite number, got {value!r}")
            return number
    if base is str and isinstance(value, str):
        return value
    raise ConfigError(f"{dotted} must be {_kind(base)}, got {value!r} ({type(value).__name__})")


def _kind(base: Any) -> str:
    if typing.get_origin(base) is list:
        return f"a list of {_KIND[typing.get_args(base)[0]].removeprefix('an ').removeprefix('a ')}s"
    return _KIND[base]


def _coerce_list(dotted: str, value: Any, item: type, from_cli: bool) -> list:
    """A YAML list, or on the command line `[1, 3]` or `1,3` (`[]` for an empty list)."""
    if from_cli and isinstance(value, str):
        text = value.strip()
        text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        value = [part.strip() for part in text.split(",")] if text.strip() else []
    if not isinstance(value, list):
        raise ConfigError(f"{dotted} must be {_kind(list[item])}, got {value!r} ({type(value).__name__})")
    return [_coerce(f"{dotted}[{i}]", v, item, from_cli) for i, v in enumerate(value)]


def _parse_cli(dotted: str, raw: str, base: type) -> Any:
    if base is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    try:
        return base(raw) if base in (int, float) else raw
    except ValueError:
        raise ConfigError(f"{dotted} must be {_KIND[base]}, got {raw!r}") from None


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe_schema(job: JobConfig | None = None) -> str:
    """Every key with its type, default and docstring: the text of `--help`. With `job` (a
    config file and overrides loaded), its values are shown as the defaults."""
    lines = []
    for f in dataclasses.fields(JobConfig):
        cls = f.default_factory
        lines.append(f"{f.name}:  {inspect.getdoc(cls).splitlines()[0]}")
        defaults, docs = (getattr(job, f.name) if job else cls()), field_docs(cls)
        for name, hint in typing.get_type_hints(cls).items():
            type_name = getattr(hint, "__name__", str(hint).replace("typing.", ""))
            lines.append(f"  --{f.name}.{name}  ({type_name}, default {getattr(defaults, name)!r})")
            lines.append(f"      {docs.get(name, '')}")
    return "\n".join(lines)
