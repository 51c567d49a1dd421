"""Overrides are coerced to the field's type; every kind of bad input gets one clear message."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.load import load_recipe, split_overrides
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def error_of(*words: str) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(list(words))
    return str(info.value)


def test_overrides_are_coerced_to_field_types():
    _, recipe = load_recipe(["recipe=lora", "train.lr=2e-4", "train.max_steps=7", "peft.target_modules=[q_proj]",
                             "train.gradient_checkpointing=true", "train.max_grad_norm=null"])
    assert recipe.train.lr == pytest.approx(2e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 7
    assert recipe.peft.target_modules == ["q_proj"]
    assert recipe.train.gradient_checkpointing is True
    assert recipe.train.max_grad_norm is None


def test_value_split_on_first_equals_and_string_fields_keep_literal_text():
    _, overrides = split_overrides(["recipe=lora", "eval.sample_prompts=[a=b]"])
    assert overrides == [("eval.sample_prompts", "[a=b]")]
    _, recipe = load_recipe(["recipe=lora", "model.name=123", "model.revision=true"])
    assert recipe.model.name == "123" and recipe.model.revision == "true"


def test_required_keys_exist_with_their_names():
    _, recipe = load_recipe(["recipe=lora", "model.name=m", "peft.method=lora", "train.lr=0.1", "train.max_steps=3",
                             "train.micro_batch_size=2", "train.global_batch_size=4", "data.train=x.jsonl",
                             "data.eval=y.jsonl", "data.format=alpaca", "output.dir=o", "distributed.backend=ddp",
                             "distributed.num_processes=2"])
    assert recipe.distributed.world_size == 2 and recipe.gradient_accumulation_steps == 1


def test_unknown_key_suggests_the_closest():
    message = error_of("recipe=lora", "train.lrr=1")
    assert "train.lrr: unknown key" in message and "Did you mean train.lr?" in message


def test_unknown_section_suggests_the_closest():
    assert "Did you mean train?" in error_of("recipe=lora", "trian.lr=1")


def test_wrong_type_names_key_and_value():
    message = error_of("recipe=lora", "train.max_steps=ten")
    assert "train.max_steps" in message and "'ten'" in message


def test_out_of_range_value():
    assert "train.micro_batch_size" in error_of("recipe=lora", "train.micro_batch_size=0")


def test_all_problems_reported_together():
    message = error_of("recipe=lora", "train.lrr=1", "eval.every_step=3")
    assert "2 problems" in message and "train.lrr" in message and "eval.every_step" in message


def test_unknown_method_suggests_one():
    assert "Did you mean lora?" in error_of("recipe=lora", "peft.method=lorra")


def test_method_specific_keys_are_checked_against_the_method():
    message = error_of("recipe=prompt_tuning", "peft.r=4")
    assert "peft.r: unknown key" in message and "num_virtual_tokens" in message


def test_batch_split_counts_world_size():
    message = error_of("recipe=lora", "distributed.num_processes=3")
    assert "world size 3" in message


@pytest.mark.parametrize("words, expected", [
    (["recipe=lora", "model.task=classification"], "model.task=classification needs data.format classification"),
    (["recipe=classify_lora", "peft.method=prompt_tuning"], "does not work with model.task=classification"),
    (["recipe=lora", "peft.method=head_only"], "a causal LM has no new task head"),
    (["recipe=lora", "eval.metric=f1"], "eval.metric=f1 is not reported for model.task=causal_lm"),
    (["recipe=prompt_tuning", "output.merge=true"], "cannot be merged"),
    (["recipe=lora", "eval.every_steps=null", "eval.early_stopping_patience=2"], "needs eval.every_steps"),
    (["recipe=lora", "distributed.machine_rank=1"], "machine_rank=1 must be below"),
    (["recipe=full_fsdp", "train.optimizer=adamw_8bit"], "adamw_8bit does not run under distributed.backend=fsdp"),
])
def test_incompatible_combinations(words, expected):
    assert expected in error_of(*words)


def test_missing_recipe_lists_available():
    message = error_of("recipe=lorra")
    assert "Did you mean recipe=lora?" in message and "classify_head" in message


def test_no_recipe_and_dash_flags():
    assert "no recipe given" in error_of("train.lr=1")
    assert "without dashes" in error_of("recipe=lora", "--train.lr=1")
    assert "not key=value" in error_of("recipe=lora", "train.lr")


def test_user_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((ROOT / "recipes" / "lora.yaml").read_text().replace("r: 8 ", "r: 4 "))
    name, recipe = load_recipe([f"recipe={path}"])
    assert name == "mine" and recipe.peft.r == 4
    path.write_text("model: [unclosed")
    assert "not valid YAML" in error_of(f"recipe={path}")


def run_cli(*args: str, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("words", [
    ["validate", "recipe=lora", "train.lrr=1"],
    ["validate", "recipe=nope"],
    ["validate", "recipe=lora", "--lr=3"],
    ["validate", "recipe=lora", "data.train=missing.jsonl"],
    ["run", "recipe=lora", "data.train=missing.jsonl"],
    ["validate", "recipe=lora", "model.name=./no/such/model"],
])
def test_cli_errors_are_one_message_without_traceback(words):
    out = run_cli(*words)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_run_script_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launcher" / "run.py"), "recipe=lora", "train.lrr=1",
                          f"output.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Did you mean train.lr?" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_validation_path_imports_no_heavy_library():
    code = ("import sys; from launcher.cli import main; main(['validate', 'recipe=lora']); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'accelerate') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_validate_prints_resolved_recipe_and_batch_arithmetic():
    out = run_cli("validate", "recipe=lora", "train.lr=3e-4", "train.global_batch_size=16")
    assert out.returncode == 0
    assert "lr: 0.0003" in out.stdout
    assert "global batch 16 = micro batch 4 x accumulation 4 x world size 1" in out.stdout


def test_keys_reference_documents_every_field():
    from launcher.config.docs import keys_reference
    from launcher.config.schema import PEFT_CLASSES, Recipe

    from pydantic import BaseModel

    text = keys_reference()

    def check(prefix: str, cls) -> None:
        for field_name, field in cls.model_fields.items():
            assert field.description, f"{prefix}{field_name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                check(f"{prefix}{field_name}.", field.annotation)  # a nested section: its keys are listed
            else:
                assert f"{prefix}{field_name}  [" in text

    for section in ("model", "distributed", "data", "train", "eval", "output"):
        check(f"{section}.", Recipe.model_fields[section].annotation)
    for cls in PEFT_CLASSES.values():
        for field_name, field in cls.model_fields.items():
            assert field.description, f"peft.{field_name} has no description"


# ---------------------------------------------------------------- paths of the wrong kind, unreadable, unwritable

@pytest.fixture
def places(tmp_path):
    """A file, folders, a minimal model folder and a data file: the raw material of wrong paths."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # enough for preflight, which loads nothing
    (tmp_path / "weights.gguf").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return tmp_path


def run_main(capsys, *words: str) -> tuple[int, str, str]:
    from launcher.cli import main

    code = main(list(words))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], err


# (words, what the one error line must say); {p} is the folder of `places`.
WRONG_PATHS = [
    (["output.dir={p}/a_file"], ["output.dir={p}/a_file", "is a file, but a folder is expected"]),
    (["output.dir={p}/a_file/run"], ["output.dir={p}/a_file/run", "{p}/a_file is a file, so no folder"]),
    (["output.dir={p}/out-{{nope}}"], ["output.dir={p}/out-{{nope}}", "placeholders are {{recipe}} and {{time}}"]),
    (["data.train={p}/folder.jsonl"], ["data.train={p}/folder.jsonl", "is a folder, but a data file"]),
    (["data.train={p}/folder"], ["data.train={p}/folder", "is a folder, but a data file"]),
    (["data.eval={p}/folder.jsonl"], ["data.eval={p}/folder.jsonl", "is a folder, but a data file"]),
    (["data.train=[{{path: {p}/rows.jsonl}}, {{path: {p}/folder.jsonl}}]"],
     ["data.train[1].path={p}/folder.jsonl", "is a folder, but a data file"]),
    (["data.train={p}/a_file/rows.jsonl"], ["data.train={p}/a_file/rows.jsonl", "does not exist"]),
    (["data.train={p}/notes.txt"], ["data.train={p}/notes.txt", "unknown file type .txt"]),
    (["data.eval={p}/notes.txt"], ["data.eval={p}/notes.txt", "unknown file type .txt"]),
    (["model.name={p}/empty_model"], ["model.name={p}/empty_model", "holds no config.json"]),
    (["model.name={p}/weights.gguf"], ["model.name={p}/weights.gguf", "holds no config.json"]),
    (["model.name={p}/a_file"], ["model.name={p}/a_file", "expected a model folder, a .gguf file"]),
    (["model.name={p}/a_file/model"], ["model.name={p}/a_file/model", "no such file or folder"]),
    (["recipe={p}/folder.jsonl"], ["recipe={p}/folder.jsonl", "is a folder, but a recipe YAML file"]),
    (["recipe={p}/a_file/lora.yaml"], ["recipe file {p}/a_file/lora.yaml does not exist"]),
    (["distributed.backend=deepspeed", "distributed.config={p}/folder"],
     ["distributed.config={p}/folder", "is a folder, but a DeepSpeed JSON file"]),
]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("words, expected", WRONG_PATHS, ids=[" ".join(w) for w, _ in WRONG_PATHS])
def test_path_of_the_wrong_kind_is_one_error_before_anything_loads(places, capsys, command, words, expected):
    base = ["recipe=lora", f"model.name={places / 'model'}", f"output.dir={places / 'out'}", "train.max_steps=1"]
    words = [w.format(p=places) for w in words]
    code, out, err = run_main(capsys, command, *base, *words)
    assert_one_error_line(code, out, err, *(e.format(p=places) for e in expected))
    assert not (places / "out").exists()


def read_only_folder(tmp_path) -> Path:
    """A folder this process cannot create anything in. Root writes through permission bits, so
    there it is /proc/sys (read-only for everyone), where the system has one."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if Path("/proc/sys").is_dir() and not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("running as root and no read-only folder to test with")


def test_output_in_a_read_only_folder_is_one_error(places, capsys, tmp_path):
    parent = read_only_folder(tmp_path)
    code, out, err = run_main(capsys, "run", "recipe=lora", f"model.name={places / 'model'}",
                              f"output.dir={parent}/run")
    assert_one_error_line(code, out, err, f"output.dir={parent}/run", f"{parent} is not writable")


UNREADABLE = [  # (name of the file in `places` to make unreadable, words, key named in the error)
    ("rows.jsonl", ["data.train={p}/rows.jsonl"], "data.train={p}/rows.jsonl"),
    ("rows.jsonl", ["data.eval={p}/rows.jsonl"], "data.eval={p}/rows.jsonl"),
    ("model/config.json", [], "model.name={p}/model"),
    ("mine.yaml", ["recipe={p}/mine.yaml"], "recipe={p}/mine.yaml"),
    ("zero2.json", ["distributed.backend=deepspeed", "distributed.config={p}/zero2.json"],
     "distributed.config={p}/zero2.json"),
]


def _unreadable_case(places, name: str, words: list[str]) -> tuple[Path, list[str]]:
    shutil.copy(ROOT / "recipes" / "lora.yaml", places / "mine.yaml")
    shutil.copy(ROOT / "ds_configs" / "zero2.json", places / "zero2.json")
    return places / name, [w.format(p=places) for w in words]


@pytest.mark.parametrize("name, words, key", UNREADABLE, ids=[u[0] + ":" + " ".join(u[1]) for u in UNREADABLE])
def test_unreadable_file_is_one_error(places, capsys, monkeypatch, name, words, key):
    """Denied as the kernel would deny it for a non-root user. Tests run as root here and in CI, and
    root reads every file whatever its mode, so the permission answer is simulated."""
    target, words = _unreadable_case(places, name, words)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if Path(path) == target and mode & os.R_OK else real_access(path, mode, **kw)))
    code, out, err = run_main(capsys, "run", "recipe=lora", f"model.name={places / 'model'}",
                              f"output.dir={places / 'out'}", *words)
    assert_one_error_line(code, out, err, key.format(p=places), "cannot be read (permission denied)")


def test_several_machines_need_an_explicit_main_process_ip():
    message = error_of("recipe=lora", "distributed.num_machines=2")
    assert "distributed.num_machines=2 needs distributed.main_process_ip" in message
    for ip in ("127.0.0.1", "10.0.0.1"):  # loopback said out loud is allowed: one host playing two machines
        _, recipe = load_recipe(["recipe=lora", "distributed.num_machines=2", f"distributed.main_process_ip={ip}"])
        assert recipe.distributed.main_process_ip == ip
    load_recipe(["recipe=lora"])  # one machine: the default is right


def test_worker_adopts_the_address_its_launcher_used(monkeypatch):
    """A worker of a hand-started multi-machine `accelerate launch` is not refused by the rule above."""
    from launcher.run import launched_world_overrides

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    _, recipe = load_recipe(["recipe=lora", "train.global_batch_size=16", *launched_world_overrides()])
    assert recipe.distributed.num_machines == 2 and recipe.distributed.main_process_ip == "10.1.2.3"
