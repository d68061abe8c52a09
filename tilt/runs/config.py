"""One config shape and one resolver for every ``tilt train`` command and ``tilt demo``.

A command's config is a tree of frozen dataclasses: a shared ``run`` section (``RunConfig``: what the run reads,
where it runs, how it keeps its records), a ``lora`` section (``LoraConfig``), the recipe's own section (named after
it: ``kl_rl``, ``dpo``, ...) and the recipe's ``sampling`` / ``data`` / ``eval`` / ``calibration`` sections. The
YAML file mirrors the tree (``run: {model: ...}``, ``kl_rl: {beta: 0.1}``) and the command-line flags are the same
fields, dotted (``--sampling.max_new_tokens 32``). A leaf name that exists in one section only (or in the recipe's
own section among others) may also be written alone, in the file or as a flag (``beta: 0.1``, ``--beta 0.1``); common TRL spellings are aliases of the fields
they map to (``learning_rate`` -> ``lr``, ...).

Values from the YAML file and from flag text get the same typed coercion, driven by each field's annotation
(``lr: 1e-5`` is a float although PyYAML reads it as text). An unknown key is one error with a "did you mean".
Relative paths written in a config file resolve against the file's folder (when the file or folder is there).

This module does not import torch: ``--help`` reads the dataclasses' fields from their source (``class_fields``)
so that help costs no heavy import; the command imports the real classes when it runs (``build``), and
tests/test_config.py checks that both readings agree.
"""
from __future__ import annotations

import ast
import difflib
import importlib
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")


class ConfigError(ValueError):
    """Bad config input (a key, a value, a file): the CLI prints it as one ``tilt: error:`` line and exits 2."""


@dataclass(frozen=True)
class RunConfig:
    """The run section every command shares: what the run reads, where it runs, how it keeps its records.
    A command uses the fields it needs and says which ones it requires."""

    model: str = field(default="", metadata={"help": "the policy (or backbone) to train: a from_pretrained folder, a cached hub id, or 'embedded'"})
    ref: str = field(default="", metadata={"help": "the reference pi_ref (same tokenizer); empty = the same as model (with LoRA: the adapter-disabled model)"})
    reward: tuple[str, ...] = field(default=(), metadata={"help": "reward spec(s), summed with reward_weights: module:function, file.py:function, a reward-model folder, sentiment, length:chars, keywords:a,b, regex:PAT (repeat --reward for several)"})
    reward_weights: tuple[float, ...] | None = field(default=None, metadata={"help": "one weight per reward spec (a comma-separated list on the command line); None = all 1"})
    prompts: str = field(default="", metadata={"help": "prompts data file (.jsonl/.csv/.parquet or a save_to_disk folder), rows {prompt} or {messages}"})
    preferences: str = field(default="", metadata={"help": "preferences data file, rows {prompt, chosen, rejected} (or chats)"})
    demonstrations: str = field(default="", metadata={"help": "demonstrations data file, rows {prompt, completion} or {messages}"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto (cuda when available)"})
    dtype: str = field(default="auto", metadata={"help": "float32, bfloat16, float16 or auto (bfloat16 on CUDA with bf16 support and on CPUs with AVX-512 BF16/AMX; else float32)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run Python code shipped with a model folder; off unless you have read that code"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a checkpoint every this many steps (and at the end); 0 = only at the end"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints; 0 = keep all"})
    sample_every: int = field(default=50, metadata={"help": "append samples to samples.jsonl every this many steps (also at step 0 and at the end); 0 = only then"})
    sample_prompts: int = field(default=4, metadata={"help": "how many prompts (the first ones of the data) samples.jsonl shows, one completion each"})
    tracker: str = field(default="none", metadata={"help": "also send metrics to: none, tensorboard, wandb or mlflow (the package must be installed)"})

    def __post_init__(self):
        if not isinstance(self.reward, tuple) or not all(isinstance(s, str) and s for s in self.reward):
            raise ValueError(f"run.reward must be a list of spec strings, got {self.reward!r}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"run.reward_weights has {len(self.reward_weights)} weights for {len(self.reward)} reward specs: "
                             "give one weight per --reward")
        if self.device not in DEVICES:
            raise ValueError(f"run.device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"run.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if min(self.checkpoint_every, self.keep_checkpoints, self.sample_every) < 0 or self.sample_prompts < 1:
            raise ValueError("run.checkpoint_every, keep_checkpoints and sample_every must be >= 0, sample_prompts >= 1")
        if self.tracker not in TRACKERS:
            raise ValueError(f"run.tracker must be one of {', '.join(TRACKERS)}; got {self.tracker!r}")

    def require(self, command: str, names: Sequence[str]) -> None:
        """Raise naming the run fields ``command`` needs and the config left empty."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            raise ConfigError(f"tilt train {command} needs run.{', run.'.join(missing)} (in the YAML file's run: section "
                              f"or as --{missing[0]} ...)")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation of the policy (tilt.engine.lora); the reference is then the adapter-disabled base model."""

    r: int = field(default=0, metadata={"help": "rank of the update; 0 = no LoRA (full fine-tuning); 16 is a common choice for small models"})
    alpha: float = field(default=32.0, metadata={"help": "the update is scaled by alpha / r (LoRA paper §4.1)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input; 0 keeps sampling-time and scoring-time log-probs equal"})
    target_modules: tuple[str, ...] | None = field(default=None, metadata={"help": "linear layers to adapt (last name component); None = every linear layer but the output head"})

    def __post_init__(self):
        if self.r < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora.r must be >= 0 (0 = off), lora.alpha > 0 and 0 <= lora.dropout < 1")

    def settings(self):
        """``tilt.engine.lora.LoraSettings`` of this section, or None when LoRA is off."""
        if not self.r:
            return None
        from tilt.engine.lora import LoraSettings

        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)


@dataclass(frozen=True)
class OracleConfig:
    """Who labels an online pair (tilt.preferences), from the run's reward."""

    oracle: str = field(default="comparison", metadata={"help": "'comparison' (A wins when r(A) > r(B)) or 'bradley-terry' (A wins with prob. sigma(scale*(r(A)-r(B))))"})
    scale: float = field(default=1.0, metadata={"help": "Bradley-Terry scale (oracle bradley-terry only)"})
    ties: str = field(default="tie", metadata={"help": "comparison oracle on equal rewards: 'tie' (dropped from the DPO term), 'first' or 'random'"})

    def __post_init__(self):
        if self.oracle not in ("comparison", "bradley-terry"):
            raise ValueError(f"labels.oracle must be one of comparison, bradley-terry; got {self.oracle!r}")
        if not self.scale > 0:
            raise ValueError(f"labels.scale must be > 0, got {self.scale}")


@dataclass(frozen=True)
class FinalEvalConfig:
    """The evaluation after training: win rate and KL against pi_ref on the first prompts."""

    eval_prompts: int = field(default=0, metadata={"help": "evaluate on the first N prompts (0 = all of them)"})
    eval_samples_per_prompt: int = field(default=8, metadata={"help": "completions per prompt from the policy and from pi_ref; 0 = no evaluation"})

    def __post_init__(self):
        if self.eval_prompts < 0 or self.eval_samples_per_prompt < 0:
            raise ValueError("eval.eval_prompts and eval.eval_samples_per_prompt must be >= 0")


@dataclass(frozen=True)
class HeldOutConfig:
    """Held-out preference pairs (the reward model's and DPO's; DPO evaluates them every ``dpo.eval_every`` steps and
    at the end as ``eval/*`` metrics) and the reward model's scoring length."""

    held_out: float = field(default=0.1, metadata={"help": "share of the pairs kept out of training to measure accuracy (a seeded split); 0 = none"})
    max_length: int | None = field(default=None, metadata={"help": "token limit of prompt + completion (cut from the left); None = no limit"})

    def __post_init__(self):
        if not 0 <= self.held_out < 1:
            raise ValueError(f"eval.held_out must be in [0, 1), got {self.held_out}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"eval.max_length must be >= 2 tokens or None, got {self.max_length}")


# --- the command trees -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """One section of a command's config: its name in the YAML file and the dataclass (``module:Class``)."""

    name: str
    ref: str
    skip: tuple[str, ...] = ()  # fields the command fixes itself
    defaults: tuple[tuple[str, Any], ...] = ()  # defaults that differ for this command


RUN = Section("run", "tilt.runs.config:RunConfig")
LORA = Section("lora", "tilt.runs.config:LoraConfig")
SAMPLING = Section("sampling", "tilt.engine.hf:SamplingConfig")
DATA = Section("data", "tilt.data:DataConfig", skip=("fmt",))
DEMO_OWN = ("model", "demonstrations", "reward", "prompts", "checkpoint_every", "bc", "rl", "sampling", "eval",
            "preferences", "reward_model")  # DemoRLConfig fields that the run section or another section holds

COMMANDS: dict[str, tuple[Section, ...]] = {
    "kl-rl": (RUN, Section("kl_rl", "tilt.recipes.kl_rl:KLRLConfig"), SAMPLING, DATA,
              Section("calibration", "tilt.infalign:CalibrationConfig"), LORA),
    "dpo": (RUN, Section("dpo", "tilt.recipes.dpo:DPOConfig"), DATA,
            Section("eval", "tilt.runs.config:HeldOutConfig", skip=("max_length",), defaults=(("held_out", 0.0),)), LORA),
    "online-dpo": (RUN, Section("online_dpo", "tilt.recipes.online_dpo:OnlineDPOConfig",
                                defaults=(("scheme", "online-dpo"), ("alpha", 0.0))),
                   Section("labels", "tilt.runs.config:OracleConfig"), SAMPLING, DATA,
                   Section("eval", "tilt.runs.config:FinalEvalConfig"), LORA),
    "xpo": (RUN, Section("xpo", "tilt.recipes.online_dpo:OnlineDPOConfig"), Section("labels", "tilt.runs.config:OracleConfig"),
            SAMPLING, DATA, Section("eval", "tilt.runs.config:FinalEvalConfig"), LORA),
    "reward-model": (RUN, Section("reward_model", "tilt.recipes.reward_model:RewardModelConfig"), DATA,
                     Section("eval", "tilt.runs.config:HeldOutConfig")),
    "demo-rl": (RUN, Section("pipeline", "tilt.pipelines.demo_rl:DemoRLConfig", skip=DEMO_OWN),
                Section("bc", "tilt.recipes.bc:BCConfig"), Section("rl", "tilt.recipes.kl_rl:KLRLConfig"), SAMPLING,
                Section("eval", "tilt.evaluation:EvalConfig")),
    "demo-rlhf": (RUN, Section("pipeline", "tilt.pipelines.demo_rl:DemoRLHFConfig", skip=DEMO_OWN),
                  Section("bc", "tilt.recipes.bc:BCConfig"), Section("rl", "tilt.recipes.kl_rl:KLRLConfig"), SAMPLING,
                  Section("eval", "tilt.evaluation:EvalConfig"),
                  Section("preferences", "tilt.pipelines.demo_rl:PreferenceConfig"),
                  Section("reward_model", "tilt.recipes.reward_model:RewardModelConfig")),
    "demo": (RUN, Section("demo", "tilt.pipelines.demo:DemoConfig"), LORA),
    "bond": (RUN, Section("bond", "tilt.recipes.bond:BONDConfig"), SAMPLING, DATA, LORA),
    "bonbon": (RUN, Section("bonbon", "tilt.recipes.bonbon:BoNBoNConfig"), SAMPLING, DATA, LORA),
    "apo": (RUN, Section("apo", "tilt.recipes.apo:APOConfig"), SAMPLING, DATA, LORA),
    "qrpo": (RUN, Section("qrpo", "tilt.recipes.qrpo:QRPOConfig"), SAMPLING, DATA, LORA),
}
"""Every command's config tree, in the order the YAML file and ``--help`` show it."""

RUN_DEFAULTS: dict[str, tuple[tuple[str, Any], ...]] = {"demo": (("model", "embedded"), ("reward", ("sentiment",)))}
"""Run-section defaults that differ by command."""

ALIASES = {
    "learning_rate": "lr", "num_generations": "samples_per_prompt", "max_completion_length": "max_new_tokens",
    "max_prompt_length": "max_prompt_tokens", "max_steps": "steps", "per_device_train_batch_size": "pairs_per_step",
    "lam": "rl.beta",
}
"""TRL's spellings (and the pipelines' ``lam``) -> the field they name, where the command has that field."""

PATH_FIELDS = ("run.model", "run.ref", "run.reward", "run.prompts", "run.preferences", "run.demonstrations",
               "calibration.calibration_cache")
"""Fields whose relative paths, written in a config file, resolve against the file's folder."""
OUTPUT_PATHS = ("calibration.calibration_cache",)


# --- field specs: from the source (help, no import) or from the class (run time) ---------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str  # the annotation as written, e.g. "int", "float | None", "tuple[str, ...]"
    default: Any
    help: str


def _module_path(module: str) -> Path:
    root = Path(__file__).resolve().parents[2]
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@lru_cache(maxsize=None)
def _module_ast(module: str) -> ast.Module:
    return ast.parse(_module_path(module).read_text(encoding="utf-8"))


def _literal(node: ast.AST, tree: ast.Module) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):  # a module-level constant
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets):
                return _literal(stmt.value, tree)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == node.id and stmt.value:
                return _literal(stmt.value, tree)
    return ast.unparse(node)


def module_constant(module: str, name: str) -> Any:
    """A module-level constant read from its source without importing the module (for ``--help``): a literal, or
    the keys of a dict whose values are not literals (a table of functions), as a list."""
    tree = _module_ast(module)
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and stmt.value is not None:
            if isinstance(stmt.value, ast.Dict):
                try:
                    return ast.literal_eval(stmt.value)
                except ValueError:
                    return [ast.literal_eval(k) for k in stmt.value.keys]
            value = _literal(stmt.value, tree)
            if isinstance(value, str) and value == ast.unparse(stmt.value) and not isinstance(stmt.value, ast.Constant):
                raise AssertionError(f"{module}.{name} is not a literal the help can read without importing it")
            return value
    raise AssertionError(f"{module} defines no constant {name}")


def class_fields(ref: str) -> list[FieldSpec]:
    """The fields of the dataclass ``module:Class`` read from its source, without importing it (``--help``).
    Fields with a ``default_factory`` (nested sections) are left out."""
    module, name = ref.split(":")
    tree = _module_ast(module)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if name not in classes:
        raise AssertionError(f"{ref}: no such class in {_module_path(module)}")
    node = classes[name]
    out: list[FieldSpec] = []
    for base in node.bases:  # a dataclass extending another one of the same module
        if isinstance(base, ast.Name) and base.id in classes:
            out.extend(class_fields(f"{module}:{base.id}"))
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        default, help_text, factory = MISSING, "", False
        value = stmt.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
            for kw in value.keywords:
                if kw.arg == "default":
                    default = _literal(kw.value, tree)
                elif kw.arg == "default_factory":
                    factory = True
                elif kw.arg == "metadata" and isinstance(kw.value, ast.Dict):
                    for k, v in zip(kw.value.keys, kw.value.values):
                        if isinstance(k, ast.Constant) and k.value == "help":
                            help_text = _literal(v, tree)
        elif value is not None:
            default = _literal(value, tree)
        if factory:
            continue
        out = [s for s in out if s.name != stmt.target.id]
        out.append(FieldSpec(stmt.target.id, ast.unparse(stmt.annotation), default, str(help_text)))
    return out


def import_class(ref: str) -> type:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def real_fields(ref: str) -> list[FieldSpec]:
    """The same as ``class_fields``, from the imported class (what ``build`` uses)."""
    out = []
    for f in fields(import_class(ref)):
        if f.default is MISSING and f.default_factory is not MISSING:
            continue
        out.append(FieldSpec(f.name, str(f.type), f.default, str(f.metadata.get("help", ""))))
    return out


def section_specs(command: str) -> dict[str, dict[str, FieldSpec]]:
    """{section: {field: spec}} of a command, from the source (no heavy import), with the command's defaults."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    out: dict[str, dict[str, FieldSpec]] = {}
    for section in COMMANDS[command]:
        defaults = dict(section.defaults) | (dict(RUN_DEFAULTS.get(command, ())) if section.name == "run" else {})
        specs = {}
        for s in class_fields(section.ref):
            if s.name in section.skip:
                continue
            specs[s.name] = FieldSpec(s.name, s.type, defaults.get(s.name, s.default), s.help) if s.name in defaults else s
        out[section.name] = specs
    return out


def key_index(command: str) -> dict[str, str]:
    """Every accepted key -> its dotted path: ``section.field``, the bare field name where only one section has it,
    and the aliases whose target the command has."""
    specs = section_specs(command)
    index: dict[str, str] = {}
    owners: dict[str, list[str]] = {}
    for section, names in specs.items():
        for name in names:
            index[f"{section}.{name}"] = f"{section}.{name}"
            owners.setdefault(name, []).append(f"{section}.{name}")
    recipe = list(specs)[1]  # the recipe's own section wins a bare name it shares (--alpha: XPO's, not LoRA's)
    for name, paths in owners.items():
        if name in specs:
            continue
        if len(paths) == 1:
            index[name] = paths[0]
        elif f"{recipe}.{name}" in paths:
            index[name] = f"{recipe}.{name}"
    for alias, target in ALIASES.items():
        if target in index and alias not in index:
            index[alias] = index[target]
    return index


def aliases_of(command: str) -> dict[str, str]:
    index = key_index(command)
    return {a: index[a] for a in ALIASES if a in index}


def ambiguous(command: str) -> dict[str, list[str]]:
    """Bare names that more than one section has (they must be written dotted)."""
    owners: dict[str, list[str]] = {}
    for section, names in section_specs(command).items():
        for name in names:
            owners.setdefault(name, []).append(f"{section}.{name}")
    index = key_index(command)
    return {n: p for n, p in owners.items() if len(p) > 1 and n not in index}


def unknown_key(command: str, key: str, *, where: str) -> ConfigError:
    index = key_index(command)
    clash = ambiguous(command).get(key.lstrip("-").replace("-", "_"))
    if clash:
        return ConfigError(f"{where}: {key!r} is in several sections of tilt train {command}: write {' or '.join(clash)}")
    dashes = "--" if key.startswith("--") else ""
    match = difflib.get_close_matches(key[len(dashes):].replace("-", "_"), list(index), n=1, cutoff=0.6)
    hint = f"; did you mean {dashes + match[0]!r}?" if match else ""
    sections = ", ".join(section_specs(command))
    return ConfigError(f"{where}: unknown config key {key!r}{hint} (sections: {sections}; `--help` lists every field)")


# --- values ------------------------------------------------------------------------------------------------------------
def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def coerce(path: str, value: Any, type_text: str) -> Any:
    """``value`` (from YAML or command-line text) as a field of annotation ``type_text``. Text is parsed the same way
    wherever it comes from: ``"1e-5"`` is a float for a float field in a YAML file and on the command line."""
    parts = [p.strip() for p in type_text.split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    base = parts[0] if parts else "Any"
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional or value is None and base == "Any":
            return None
        raise ConfigError(f"{path} cannot be null; it takes {_a(base)}")
    try:
        if base == "int":
            if isinstance(value, str):
                return int(value.strip())
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if base == "float":
            if isinstance(value, str):
                return float(value.strip())
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if base == "bool":
            if isinstance(value, str):
                word = value.strip().lower()
                if word not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise TypeError
                return word in ("true", "yes", "1", "on")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if base.startswith("tuple[float") or base.startswith("list[float"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not items:
                raise TypeError
            return tuple(coerce(path, v, "float") for v in items)
        if base.startswith("tuple") or base.startswith("list"):
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
                raise TypeError
            return tuple(items)
        if base == "Any":  # a number or a per-step list of numbers (the online recipes' schedules)
            if isinstance(value, str):
                values = [coerce(path, v, "float") for v in value.split(",")]
                return values[0] if len(values) == 1 else values
            if isinstance(value, (list, tuple)) and value:
                return [coerce(path, v, "float") for v in value]
            return coerce(path, value, "float")
    except (TypeError, ValueError, ConfigError):
        shown = {"Any": "number or a list of numbers"}.get(base, base)
        raise ConfigError(f"{path} must be {_a(shown)}{' or null' if optional else ''}; got {value!r}") from None
    return value


def _resolve_path(text: str, base_dir: Path, *, output: bool = False) -> str:
    """``text`` against ``base_dir`` when it is relative and names something there (an output path: always);
    else unchanged (a hub id, ``embedded``, or a path the loader will report as missing)."""
    if not text or Path(text).is_absolute():
        return text
    candidate = base_dir / text
    return str(candidate) if output or candidate.exists() else text


def _resolve_spec(spec: str, base_dir: Path) -> str:
    """A reward spec with its file (``file.py:function``) or folder resolved against ``base_dir``."""
    head, sep, tail = spec.partition(":")
    if sep and head.endswith(".py"):
        return _resolve_path(head, base_dir) + sep + tail
    return _resolve_path(spec, base_dir) if not sep else spec


# --- resolution --------------------------------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict:
    """A config file's mapping. A missing file, bad YAML or a non-mapping is a ``ConfigError`` naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of config keys (run:, sections, fields), got {type(data).__name__}")
    return data


def flatten(command: str, data: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """{dotted path: raw value} of a config mapping: sections as mappings, dotted keys, bare names and aliases."""
    index = key_index(command)
    specs = section_specs(command)
    out: dict[str, Any] = {}
    for key in ("recipe", "command", "pipeline"):  # a file written for another command: say so first
        value = data.get(key)
        if isinstance(value, str) and value != command:
            raise ConfigError(f"{where}: the config is for {value!r}, not tilt train {command}")
    for key, value in data.items():
        key = str(key)
        if key in ("recipe", "command") or (key == "pipeline" and isinstance(value, str)):
            continue
        if key in specs:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping of its fields; got {value!r}")
            for sub, v in value.items():
                if str(sub) not in specs[key]:
                    raise unknown_key(command, f"{key}.{sub}", where=where)
                out[f"{key}.{sub}"] = v
            continue
        if key not in index:
            raise unknown_key(command, key, where=where)
        out[index[key]] = value
    return out


def parse_flags(command: str, tokens: Sequence[str]) -> dict[str, Any]:
    """{dotted path: text or list of texts} from command-line tokens ``--key value`` / ``--key=value``; a list field
    collects every value given (``--reward A --reward B`` or ``--reward A B``); a bare bool flag means true."""
    index = key_index(command)
    specs = section_specs(command)
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {token!r} (fields are given as --name value)")
        key, eq, inline = token[2:].partition("=")
        name = key.replace("-", "_") if key.replace("-", "_") in index else key
        if name not in index:
            raise unknown_key(command, f"--{key}", where="command line") if not key.startswith("-") else \
                ConfigError(f"command line: bad flag {token!r}")
        path = index[name]
        section, leaf = path.split(".", 1)
        type_text = specs[section][leaf].type
        values = [inline] if eq else []
        i += 1
        many = type_text.startswith(("tuple", "list"))
        while not eq and i < len(tokens) and not tokens[i].startswith("--") and (many or not values):
            values.append(tokens[i])
            i += 1
        if not values:
            if type_text.split("|")[0].strip() == "bool":
                values = ["true"]
            else:
                raise ConfigError(f"command line: --{key} needs a value")
        if many and not type_text.startswith(("tuple[float", "list[float")):
            out[path] = list(out.get(path, [])) + values
        else:
            out[path] = values[0] if len(values) == 1 else ",".join(values)
    return out


def resolve(command: str, from_file: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None, *,
            base_dir: str | Path | None = None, where: str = "config") -> dict:
    """The resolved config of ``command`` as a nested plain dict (what RUN/config.yaml holds): the defaults, then
    the file's values, then the flags (``parse_flags``); every value coerced by its field's type. ``base_dir``: the
    config file's folder, against which its relative paths resolve. Raises ``ConfigError``."""
    specs = section_specs(command)
    values: dict[str, Any] = {}
    for path, raw in flatten(command, from_file or {}, where=where).items():
        section, leaf = path.split(".", 1)
        value = coerce(path, raw, specs[section][leaf].type)
        if base_dir is not None and path in PATH_FIELDS:
            if path == "run.reward":
                value = tuple(_resolve_spec(s, Path(base_dir)) for s in value)
            elif isinstance(value, str):
                value = _resolve_path(value, Path(base_dir), output=path in OUTPUT_PATHS)
        values[path] = value
    for path, raw in (flags or {}).items():
        section, leaf = path.split(".", 1)
        values[path] = coerce(f"--{path}", raw, specs[section][leaf].type)
    out: dict[str, Any] = {"recipe": command}
    for section, names in specs.items():
        out[section] = {}
        for name, spec in names.items():
            value = values.get(f"{section}.{name}", spec.default)
            out[section][name] = list(value) if isinstance(value, tuple) else value
    if "ref" in out["run"] and not out["run"]["ref"] and not out.get("lora", {}).get("r"):
        out["run"]["ref"] = out["run"]["model"]
    return out


def build(config: Mapping[str, Any]) -> dict[str, Any]:
    """{section: dataclass instance} of a resolved config: every section checks its values now (before anything is
    loaded or written). A section's own error is a ``ConfigError`` prefixed with the section's name."""
    command = config["recipe"]
    out: dict[str, Any] = {}
    for section in COMMANDS[command]:
        cls = import_class(section.ref)
        kwargs = {}
        types = {f.name: str(f.type) for f in fields(cls)}
        for name, value in config[section.name].items():
            kwargs[name] = tuple(value) if isinstance(value, list) and types.get(name, "").startswith("tuple") else value
        if section.name == "pipeline":
            continue  # assembled by the pipeline from every section (tilt.pipelines.demo_rl.config_from_sections)
        if section.skip and "fmt" in section.skip:
            kwargs["fmt"] = DATA_FORMAT.get(command, "prompts")
        try:
            out[section.name] = cls(**kwargs)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(f"{section.name}.") else f"{section.name}: {message}") from None
    return out


DATA_FORMAT = {"dpo": "preferences", "reward-model": "preferences"}
"""The data format of a command's ``data`` section (fixed by the command)."""


def changed_fields(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted paths whose values differ between two resolved configs."""
    out = []
    for section, values in new.items():
        if not isinstance(values, Mapping):
            continue
        old = saved.get(section) or {}
        out.extend(f"{section}.{k}" for k, v in values.items() if old.get(k) != v)
    return out


# --- help ---------------------------------------------------------------------------------------------------------------
def fields_help(command: str) -> str:
    """Every field of ``command``: flag, type, default and help, by section; then the aliases."""
    index = key_index(command)
    short = {path: key for key, path in index.items() if "." not in key and key not in ALIASES}
    lines = []
    for section, names in section_specs(command).items():
        lines.append(f"{section}: (YAML section {section}:)")
        for name, spec in names.items():
            path = f"{section}.{name}"
            flag = f"--{path}" + (f", --{short[path]}" if path in short else "")
            default = "-" if spec.default is MISSING else repr(list(spec.default) if isinstance(spec.default, tuple) else spec.default)
            lines.append(f"  {flag} {spec.type.replace(' | None', '').upper().replace(' ', '')}")
            lines.append(f"      {spec.help} (default: {default})")
    aliases = aliases_of(command)
    if aliases:
        lines.append("TRL spellings accepted: " + ", ".join(f"{a} = {p}" for a, p in aliases.items()))
    return "\n".join(lines)
