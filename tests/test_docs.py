"""The documentation says what the code and the configs do.

README.md, docs/*.md and the experiments' READMEs are read as a user would: every
``python -m diagvi.train`` command and every inline override composes against configs/, the
numbers quoted as defaults equal the configs, the config-group table lists every group and
option, every public ``DIAGVI`` method is documented, the README's Python snippets call
existing methods with existing arguments, named modules, functions and make targets exist, and
a run writes the files the README lists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import shlex
from pathlib import Path

import anndata as ad
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

import diagvi  # noqa: F401  (fills the registries)
from diagvi import stream
from diagvi.lit import DEFAULT_WEIGHTS
from diagvi.model import DIAGVI

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
README = ROOT / "README.md"
USER_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
EXPERIMENT_DOCS = sorted((ROOT / "experiments").glob("*/README.md"))
MISSING = object()
# Hydra launchers that are optional plugins (pip install -e ".[cluster]")
LAUNCHER_PLUGINS = {
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "local_parallel": "hydra_plugins.hydra_joblib_launcher",
}
# words of a documented command line that stand for "more of the same"
PLACEHOLDERS = {"...", "&", "[override", "...]"}
# inline `key=value` spans that describe a config file's value rather than an override
NOT_OVERRIDES = {"accelerator=auto"}  # README's trainer row: what trainer=default sets


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(doc: str) -> list[tuple[int, str]]:
    """``(first line number, text)`` of each fenced or 4-space-indented code block."""
    blocks, lines, i = [], doc.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            start, i = i + 2, i + 1
            body = []
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((start, "\n".join(body)))
        elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start, body = i + 1, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            blocks.append((start, "\n".join(body)))
            continue
        i += 1
    return blocks


def without_code_blocks(doc: str) -> str:
    return re.sub(r"```.*?```", "", doc, flags=re.S)


def train_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv after diagvi.train)`` of every documented ``-m diagvi.train`` command."""
    found = []
    for path in [*USER_DOCS, *EXPERIMENT_DOCS]:
        doc = text(path)
        for start, block in code_blocks(doc):
            joined = re.sub(r"\\\n\s*", " ", block)
            for k, line in enumerate(joined.splitlines()):
                if "-m diagvi.train" in line:
                    where = f"{path.relative_to(ROOT)}:{start + k}"
                    found.append((where, line.split("-m diagvi.train", 1)[1]))
        if path in USER_DOCS:  # inline commands, e.g. in docs/cluster.md's table
            for span in re.findall(r"`([^`]*-m diagvi\.train[^`]*)`", without_code_blocks(doc)):
                found.append((f"{path.relative_to(ROOT)} `{span}`", span.split("diagvi.train")[1]))
    return [
        (where, shlex.split(re.sub(r"\$\{?\w+\}?", "0", rest), comments=True))
        for where, rest in found
    ]


OVERRIDE = re.compile(r"^[a-z_][a-z0-9_./@]*=[^\s\"'<>()]+$")


def inline_overrides() -> list[tuple[str, list[str]]]:
    """Inline spans of README and docs/cluster.md made only of ``key=value`` overrides
    (docs/input_checks.md's ``key=value`` are Python arguments)."""
    found = []
    for path in (README, ROOT / "docs" / "cluster.md"):
        for span in re.findall(r"`([^`]+)`", without_code_blocks(text(path))):
            words = span.split()
            if words and all(OVERRIDE.match(w) for w in words) and span not in NOT_OVERRIDES:
                found.append((f"{path.relative_to(ROOT)} `{span}`", words))
    return found


def is_sweep(override: str) -> bool:
    return OverridesParser.create().parse_overrides([override])[0].is_sweep_override()


def compose_checked(overrides: list[str]):
    """Compose ``train`` with ``overrides`` as Hydra would; sweep expressions (choice,
    interval, tag) are checked to name an existing key instead of being applied."""
    launcher = next((o.split("=")[1] for o in overrides if o.startswith("hydra/launcher=")), None)
    if launcher in LAUNCHER_PLUGINS and not importlib.util.find_spec(LAUNCHER_PLUGINS[launcher]):
        pytest.skip(f"hydra/launcher={launcher}: plugin not installed (.[cluster])")
    sweeps = [o for o in overrides if is_sweep(o)]
    plain = [o for o in overrides if o not in sweeps]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=plain, return_hydra_config=True)
    for o in sweeps:
        key = o.split("=", 1)[0]
        assert OmegaConf.select(cfg, key, default=MISSING) is not MISSING, f"no key {key}"
    return cfg


COMMANDS = train_commands()


def test_commands_are_found():
    wheres = " ".join(w for w, _ in COMMANDS)
    assert len(COMMANDS) >= 15
    for name in ("README.md", "docs/cluster.md", "experiments/benchmark/README.md"):
        assert name in wheres


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_train_command_composes(where, argv):
    overrides = []
    for word in argv:
        if word in PLACEHOLDERS or word == "--multirun":
            continue
        assert "=" in word, f"{where}: {word!r} is neither an override nor --multirun"
        overrides.append(word)
    compose_checked(overrides)


INLINE = inline_overrides()
# the context an inline override is read in: the documented groups whose keys it may name
CONTEXT = {"data": "h5ad", "trainer": "ddp", "hparams_search": "diagvi_optuna"}
CONTEXT["hydra/launcher"] = "slurm"


@pytest.mark.parametrize(("where", "words"), INLINE, ids=[w for w, _ in INLINE])
def test_inline_override_names_a_key(where, words):
    groups = {w.split("=")[0] for w in words}
    context = [f"{g}={o}" for g, o in CONTEXT.items() if g not in groups]
    if any(w.startswith("hydra.launcher.") for w in words) or "hydra/launcher=slurm" in words:
        name = LAUNCHER_PLUGINS["slurm"]
        if not importlib.util.find_spec(name):
            pytest.skip("hydra-submitit-launcher not installed")
    else:
        context = [c for c in context if not c.startswith("hydra/launcher=")]
    compose_checked([*context, *words])


def test_readme_loss_weight_defaults_equal_config():
    readme = " ".join(text(README).split())
    loss = re.search(r"Loss = (.*?)\(defaults ([\d. /]+), all under `model\.`\)", readme)
    assert loss, "README's loss sentence moved"
    names = re.findall(r"`(lam_\w+)`", loss.group(1))
    quoted = [float(v) for v in loss.group(2).split("/")]
    config = OmegaConf.load(CONFIG_DIR / "model" / "diagvi.yaml")
    api = inspect.signature(DIAGVI.train).parameters
    assert sorted(names) == sorted(DEFAULT_WEIGHTS)
    for name, value in zip(names, quoted, strict=True):
        assert value == config[name] == DEFAULT_WEIGHTS[name] == api[name].default, name


def _squash(path: Path) -> str:
    return " ".join(text(path).split())


def test_quoted_numbers_equal_configs_and_code():
    readme, cluster = _squash(README), _squash(ROOT / "docs" / "cluster.md")
    load = lambda *p: OmegaConf.load(CONFIG_DIR.joinpath(*p))  # noqa: E731
    uot, h5ad = load("model", "alignment", "uot.yaml"), load("data", "h5ad.yaml")
    search, gpu = load("hparams_search", "diagvi_optuna.yaml"), load("trainer", "gpu.yaml")
    assert f"`model.alignment.feature_weight={uot.feature_weight}`" in readme
    assert f"`data.backed_limit_gb` ({h5ad.backed_limit_gb:g} GB)" in readme
    assert f"chunks of {stream.CHUNK_ROWS:,} cells" in readme
    assert f"a buffer of {stream.BUFFER_CHUNKS} chunks" in readme
    trials, epochs = search.hydra.sweeper.n_trials, search.trainer.max_epochs
    assert f"({trials} trials x {epochs} epochs)" in readme
    assert f"`default` (`accelerator={load('trainer', 'default.yaml').accelerator}`)" in readme
    assert (
        f"sets `accelerator: {gpu.accelerator}`, `devices: {gpu.devices}` and "
        f"`precision: {gpu.precision}`"
    ) in cluster
    torch_pin = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", text(ROOT / "Makefile"), re.M)
    assert f"torch {torch_pin.group(1)} CPU build" in readme


def test_benchmark_settings_quoted_in_readme():
    readme = _squash(README)
    settings = text(ROOT / "experiments" / "benchmark" / "results.md")
    epochs = re.search(r"epochs=(\d+)", settings).group(1)
    threads = re.search(r"threads=(\d+)", settings).group(1)
    assert f'make bench ARGS="--epochs {epochs} --threads {threads}"' in readme


def config_groups() -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for p in CONFIG_DIR.rglob("*.yaml"):
        if p.parent != CONFIG_DIR:
            groups.setdefault(p.parent.relative_to(CONFIG_DIR).as_posix(), set()).add(p.stem)
    return groups


def test_config_group_table_lists_every_group_and_option():
    section = text(README).split("### Config groups")[1].split("\n\n")[1]
    table = {}
    for row in section.splitlines()[2:]:
        group, options = (c.strip() for c in row.strip("|").split("|"))
        group = group.strip("`").split("@")[0]
        table[group] = {o for o in re.findall(r"`([^`]+)`", options) if re.fullmatch(r"\w+", o)}
    actual = config_groups()
    # `model` has one option (diagvi); its keys are the `model.*` overrides README names
    assert actual.pop("model") == {"diagvi"}
    assert table == actual


def test_every_public_diagvi_method_is_documented():
    readme = text(README)
    public = [n for n in vars(DIAGVI) if not n.startswith("_")]
    assert {"train", "save", "load"} <= set(public)
    undocumented = [n for n in public if f"{n}(" not in readme]
    assert not undocumented


def python_calls():
    """``(where, method name, call)`` of each ``DIAGVI(...)`` (``__init__``), ``DIAGVI.x(...)``
    and ``model.x(...)`` in README's Python blocks; ``call`` is None for an attribute read."""
    calls = []
    for start, block in code_blocks(text(README)):
        try:
            tree = ast.parse(block)
        except SyntaxError:
            continue  # a shell block
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("DIAGVI", "model")
            ):
                calls.append((f"README.md:{start + node.lineno - 1}", node.func.attr, node))
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "DIAGVI":
                calls.append((f"README.md:{start + node.lineno - 1}", "__init__", node))
        for node in ast.walk(tree):  # the model's attributes read without a call
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Attribute):
                if isinstance(node.value.value, ast.Name) and node.value.value.id == "model":
                    calls.append((f"README.md:{start + node.lineno - 1}", node.value.attr, None))
    return calls


CALLS = python_calls()


def test_readme_snippets_are_found():
    assert {"__init__", "setup_anndata", "train", "load"} <= {m for _, m, _ in CALLS}


@pytest.mark.parametrize(("where", "method", "call"), CALLS, ids=[w for w, _, _ in CALLS])
def test_readme_snippet_calls_existing_api(where, method, call):
    if call is None:  # an attribute, set on the instance (e.g. history, by train)
        source = inspect.getsource(DIAGVI)
        assert hasattr(DIAGVI, method) or re.search(rf"self\.{method}\b", source), where
        return
    assert hasattr(DIAGVI, method), f"{where}: DIAGVI has no {method}"
    params = inspect.signature(getattr(DIAGVI, method)).parameters
    if method == "__init__" or "self" in params:
        params = {k: v for k, v in params.items() if k != "self"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = {k.arg for k in call.keywords} - set(params)
    assert not unknown, f"{where}: {method}() has no argument {sorted(unknown)}"
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD,)]
    assert len(call.args) <= len(positional), where


def test_named_functions_and_modules_exist():
    names = set()
    for path in USER_DOCS:
        names |= set(re.findall(r"`(diagvi(?:\.\w+)+)", text(path)))
    assert "diagvi.checks.check_adatas" in names
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"{name}: no {attr}"
                obj = getattr(obj, attr)
            break


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z][a-z-]*):", text(ROOT / "Makefile"), re.M))
    named = set()
    for path in [*USER_DOCS, *EXPERIMENT_DOCS]:
        doc = text(path)
        for _, block in code_blocks(doc):
            named |= set(re.findall(r"^\s*make ([a-z][a-z-]*)", block, re.M))
        named |= set(re.findall(r"`make ([a-z][a-z-]*)", without_code_blocks(doc)))
    assert {"demo", "test", "sweep", "bench", "bench-scale", "install"} <= named
    assert named <= targets


def test_run_writes_the_files_readme_lists(tmp_path, monkeypatch, capsys):
    """The demo run (``make demo``, one epoch) writes what README lists and prints FOSCTTM."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    readme = _squash(README)
    listed = re.search(r"Each run writes into `outputs/train/<timestamp>/`: (.*?)\. ", readme)
    assert listed
    files = re.findall(r"`([^`]+)`", listed.group(1))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["logger=none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"],
            return_hydra_config=True,
        )
    run_dir = OmegaConf.to_container(cfg.hydra.run)["dir"]  # unresolved
    assert run_dir.startswith("outputs/${task_name}/") and cfg.task_name == "train"
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # @hydra.main hands the job its config without the hydra node
        del cfg["hydra"]
    try:
        from diagvi.train import run

        run(cfg)
    finally:
        HydraConfig.instance().cfg = None
    printed = capsys.readouterr().out
    assert "FOSCTTM" in printed and f"outputs in {tmp_path}" in printed
    modalities = list(cfg.data.modalities)
    for name in files:
        if name.startswith("obsm"):
            continue
        paths = [name.replace("<modality>", m) for m in modalities]
        for p in paths:
            assert (tmp_path / p.rstrip("/")).exists(), f"README lists {name}"
    key = re.search(r"obsm\['(\w+)'\]", listed.group(1)).group(1)
    assert key in ad.read_h5ad(tmp_path / f"latent_{modalities[0]}.h5ad").obsm
    assert "foscttm" in json.loads((tmp_path / "metrics.json").read_text())


def test_ddp_in_a_sweep_refused_only_beyond_one_process():
    """docs/cluster.md: a sweep trial with trainer=ddp fails only when it would start more
    than one process; on one device it runs."""
    from hydra.types import RunMode
    from hydra.utils import instantiate

    from diagvi.train import check_not_relaunched_in_sweep

    cluster = _squash(ROOT / "docs" / "cluster.md")
    assert "(`trainer=ddp` on one device runs as one process)" in cluster
    base = ["data=synthetic", "logger=none", "callbacks=none", "trainer=ddp"]
    for devices, refused in ((1, False), (2, True)):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[*base, "trainer.accelerator=cpu", f"trainer.devices={devices}"],
                return_hydra_config=True,
            )
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "unused"
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(cfg)
        try:
            trainer = instantiate(cfg.trainer, logger=False, default_root_dir=None)
            if refused:
                with pytest.raises(ValueError, match="cannot start its own"):
                    check_not_relaunched_in_sweep(trainer)
            else:
                check_not_relaunched_in_sweep(trainer)
        finally:
            HydraConfig.instance().cfg = None
