"""Checkpoints never lose or silently corrupt a run: kill -9 at every point of a save, truncation and
a flipped byte in every file, a missing or stale ``latest``, another run's checkpoints in the same
directory, a torn metrics.jsonl. The model is a Linear(3, 2) (checkpoint level) or the tiny Qwen2
of the trainer tests (trainer level)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from grpo_kernels.train import checkpoint as ckpt
from grpo_kernels.train.checkpoint import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from grpo_kernels.train.config import ConfigError

RUN = "run-a"


class _Killed(BaseException):
    """A kill -9 stand-in: nothing after the fault point runs, no cleanup either."""


def _model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # AdamW state exists, so that it is saved and checked too
    return model, optimizer


def _save(output_dir, step, seed=None, keep=2, run_id=RUN):
    model, optimizer = _model(step if seed is None else seed)
    save_checkpoint(str(output_dir), step, model=model, optimizer=optimizer, trainer_state={"step": step}, rank=0,
                    run_id=run_id, keep=keep)
    return model.weight.detach().clone()


def _loaded(path):
    model, optimizer = _model(99)
    state = load_checkpoint(str(path), model=model, optimizer=optimizer, rank=0)
    return state["step"], model.weight.detach().clone()


@pytest.mark.parametrize("point", ckpt.SAVE_POINTS)
def test_a_kill_at_any_point_of_a_save_loses_nothing(tmp_path, monkeypatch, point):
    """checkpoint-2 exists; the save of step 4 (or the re-save of step 2) dies at ``point``: resume
    finds an intact checkpoint holding exactly what was saved, step 4 once its manifest was written."""
    for resave in (False, True) if point != "old_set_aside" else (True,):  # only a re-save sets the old copy aside
        directory = tmp_path / f"resave{resave}"
        old = _save(directory, 2)

        def fault(p):
            if p == point:
                raise _Killed

        monkeypatch.setattr(ckpt, "_fault_point", fault)
        step = 2 if resave else 4
        with pytest.raises(_Killed):
            _save(directory, step, seed=7)
        monkeypatch.undo()
        new = _model(7)[0].weight.detach().clone()
        saved_completely = ckpt.SAVE_POINTS.index(point) >= ckpt.SAVE_POINTS.index("manifest_written")
        path, _ = find_resumable(str(directory), log=lambda message: None)
        resumed_step, weight = _loaded(path)
        assert resumed_step == (step if saved_completely else 2), (point, path)
        assert torch.equal(weight, new if saved_completely else old), (point, path)
        # the next save of the same step goes through and leaves one clean checkpoint for it
        _save(directory, step, seed=8)
        assert not [n for n in os.listdir(directory) if n.startswith(f"checkpoint-{step}.")], os.listdir(directory)
        assert torch.equal(_loaded(find_resumable(str(directory))[0])[1], _model(8)[0].weight.detach())


def test_kill_9_in_a_real_save_then_resume(tmp_path):
    """A real SIGKILL (the fault-injection hook) right after checkpoint-1 is renamed into place, before
    `latest` exists (the case that used to start over and prune): resume continues from step 1."""
    script = textwrap.dedent(f"""
        import torch
        from grpo_kernels.train.checkpoint import save_checkpoint
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 2)
        torch.save(model.state_dict(), {str(tmp_path / "expected.pt")!r})
        save_checkpoint({str(tmp_path / "run")!r}, 1, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        trainer_state={{"step": 1}}, rank=0, run_id="r")
        print("not reached")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **{ckpt.FAULT_ENV: "installed"}))
    assert result.returncode == -9 and "not reached" not in result.stdout, result.stderr[-2000:]
    assert not (tmp_path / "run" / "latest").exists()
    path, problems = find_resumable(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "checkpoint-1") and problems == []
    model, optimizer = torch.nn.Linear(3, 2), None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert load_checkpoint(path, model=model, optimizer=optimizer, rank=0)["step"] == 1
    assert torch.equal(model.weight, torch.load(tmp_path / "expected.pt")["weight"])


def _checkpoint_files(path):
    return sorted(os.path.relpath(os.path.join(root, name), path) for root, _, names in os.walk(path) for name in names)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damage_to_any_file_is_caught_named_and_falls_back(tmp_path, damage, capsys):
    _save(tmp_path, 2)
    good = _save(tmp_path, 4)
    files = _checkpoint_files(tmp_path / "checkpoint-4")
    assert {"manifest.json", "trainer_state.pt", "rng_rank0.pt", "model/.metadata"} <= set(files)
    for name in files:
        directory = tmp_path / f"copy-{damage}-{name.replace('/', '_')}"
        shutil.copytree(tmp_path, directory, ignore=shutil.ignore_patterns("copy-*"))
        target = directory / "checkpoint-6" / name
        _save(directory, 6, keep=None)  # a newer step (a copy of checkpoint-4 would still be step 4)
        data = bytearray(target.read_bytes())
        if damage == "truncate":
            target.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            data[len(data) // 2] ^= 0x10  # one bit in the middle: tensor data in the .distcp file
            target.write_bytes(data)
        else:
            target.unlink()
        with pytest.raises(CheckpointError, match=rf"checkpoint-6([/\\](manifest\.json|{name.replace('.', '[.]')})|: incomplete \(no manifest.json)"):
            verify_checkpoint(str(directory / "checkpoint-6"))
        path, problems = find_resumable(str(directory))
        assert path == str(directory / "checkpoint-4") and len(problems) == 1, name
        out = capsys.readouterr().out
        assert "skipping a checkpoint" in out and "falling back to" in out and "checkpoint-4" in out
        assert torch.equal(_loaded(path)[1], good)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    _save(tmp_path, 3)
    trainer_state = tmp_path / "checkpoint-3" / "trainer_state.pt"
    trainer_state.write_bytes(trainer_state.read_bytes()[:10])
    (tmp_path / "checkpoint-5.tmp").mkdir()  # an interrupted save: no manifest
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoint-5.tmp: incomplete.*"
                                              r"trainer_state.pt: truncated or altered \(10 bytes"):
        find_resumable(str(tmp_path))
    assert find_resumable(str(tmp_path / "empty")) == (None, [])


def test_a_flipped_byte_in_the_manifest_is_caught(tmp_path):
    _save(tmp_path, 1)
    manifest = tmp_path / "checkpoint-1" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace(RUN, "run-b"))  # still valid JSON, but not what was written
    with pytest.raises(CheckpointError, match=r"manifest.json: corrupt"):
        verify_checkpoint(str(tmp_path / "checkpoint-1"))


def test_pruning_keeps_other_runs_and_later_steps(tmp_path):
    _save(tmp_path, 10, run_id="other")  # another run's, and a later step: never pruned by this run
    (tmp_path / "checkpoint-0").mkdir()  # an incomplete directory whose run cannot be told
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0", "checkpoint-10", "checkpoint-2", "checkpoint-3", "latest"]
    _save(tmp_path, 4, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0", "checkpoint-10", "checkpoint-4", "latest"]
    _save(tmp_path, 5, keep=None)
    assert "checkpoint-4" in os.listdir(tmp_path)


# --- the trainer -------------------------------------------------------------------------------------


def _trainer(output_dir, **overrides):
    from test_train_loop import tiny_trainer

    return tiny_trainer(output_dir, **overrides)


def _state(trainer):
    return {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}


def test_resume_without_latest_finds_the_checkpoints_and_deletes_nothing(tmp_path, capsys):
    """The reported data loss: checkpoints present, `latest` missing. Resume continues from the newest
    complete one, keeps the metrics, and the first save of the resumed run prunes nothing newer."""
    options = dict(max_steps=2, save_every=1)
    first = _trainer(tmp_path, **options)
    first.train()
    after_2 = _state(first)
    os.remove(tmp_path / "latest")
    os.remove(tmp_path / "run.json")  # as in a directory written before run.json existed
    shutil.rmtree(tmp_path / "checkpoint-2")
    resumed = _trainer(tmp_path, resume=True, **options)
    assert resumed.step == 1 and resumed.run_id == first.run_id
    assert [r["step"] for r in resumed.history] == [1]
    resumed.train()
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_id": first.run_id}
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    for name, value in after_2.items():  # step 2 redone exactly
        assert torch.equal(value, _state(resumed)[name]), name


def test_corrupt_newest_checkpoint_falls_back_in_the_trainer(tmp_path, capsys):
    _trainer(tmp_path, max_steps=2, save_every=1).train()
    distcp = [n for n in os.listdir(tmp_path / "checkpoint-2" / "model") if n.endswith(".distcp")][0]
    target = tmp_path / "checkpoint-2" / "model" / distcp
    data = bytearray(target.read_bytes())
    data[-100] ^= 0x40  # tensor data (an Adam moment, a weight): this used to resume silently
    target.write_bytes(data)
    (tmp_path / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text() + '{"step": 3, "rew')  # torn
    resumed = _trainer(tmp_path, max_steps=2, save_every=1, resume=True)
    out = capsys.readouterr().out
    assert f"{distcp}: corrupt" in out and "falling back to" in out and "checkpoint-1" in out
    assert "line 3: not a metrics record" in out
    assert resumed.step == 1 and [r["step"] for r in resumed.history] == [1]
    resumed.train()  # redoes step 2 and replaces the corrupt checkpoint
    verify_checkpoint(str(tmp_path / "checkpoint-2"))


def test_a_fresh_run_refuses_another_runs_directory(tmp_path):
    _trainer(tmp_path, max_steps=1).train()
    with pytest.raises(ConfigError, match=r"holds another run \(checkpoint-1, latest, metrics.jsonl, run.json\).*--resume.*"
                                          r"--overwrite_output_dir"):
        _trainer(tmp_path, max_steps=1)
    assert (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "metrics.jsonl").exists()
    trainer = _trainer(tmp_path, max_steps=1, overwrite_output_dir=True)
    assert not (tmp_path / "checkpoint-1").exists() and not (tmp_path / "metrics.jsonl").exists()
    trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir()


def test_resume_with_nothing_intact_stops(tmp_path):
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*checkpoint-4.tmp: incomplete"):
        _trainer(tmp_path, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


# --- issue #21: the manifest's step, another model, another run, the output directory ----------------


def test_the_manifest_step_wins_over_the_folder_name(tmp_path, capsys):
    """checkpoint-2 renamed to checkpoint-99: resume takes the newest step by manifest (4), not the
    folder name; alone, checkpoint-99 resumes at step 2 and says so."""
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=None)
    os.rename(tmp_path / "checkpoint-2", tmp_path / "checkpoint-99")
    path, problems = find_resumable(str(tmp_path))
    assert path == str(tmp_path / "checkpoint-4") and problems == []
    for step in (1, 3, 4):
        shutil.rmtree(tmp_path / f"checkpoint-{step}")
    path, _ = find_resumable(str(tmp_path))
    assert path == str(tmp_path / "checkpoint-99") and _loaded(path)[0] == 2
    assert "checkpoint-99 holds step 2 (its manifest), not 99" in capsys.readouterr().out
    assert json.loads((tmp_path / "checkpoint-99" / "manifest.json").read_text())["step"] == 2


def test_a_renamed_checkpoint_is_neither_pruned_nor_overwritten(tmp_path, capsys):
    """The run's own checkpoint under a name it did not write (checkpoint-2 renamed to checkpoint-5) is
    never pruned, and a save of step 5 sets it aside instead of deleting it."""
    for step in (1, 2):
        _save(tmp_path, step, keep=None)
    os.rename(tmp_path / "checkpoint-2", tmp_path / "checkpoint-5")
    for step in (3, 4):
        _save(tmp_path, step, keep=1)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]
    _save(tmp_path, 5, keep=None)
    kept = [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-5.kept")]
    assert len(kept) == 1 and "set aside" in capsys.readouterr().out
    assert _loaded(tmp_path / kept[0])[0] == 2 and _loaded(tmp_path / "checkpoint-5")[0] == 5


def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path):
    """dcp's CheckpointException derives from BaseException: it used to escape as a 60-line traceback."""
    _save(tmp_path, 1)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"checkpoint-1 holds another model than this one.*weight: \[2, 3\] "
                                              r"in the checkpoint, \[2, 4\] here") as error:
        load_checkpoint(str(tmp_path / "checkpoint-1"), model=model, optimizer=optimizer, rank=0)
    assert "\n" not in str(error.value)
    extra = torch.nn.Sequential(torch.nn.Linear(3, 2))  # other parameter names
    with pytest.raises(CheckpointError, match=r"holds another model .*2 parameters of this model are not in it "
                                              r"\(0.bias, 0.weight\); 2 of its are not in this model \(bias, weight\)"):
        load_checkpoint(str(tmp_path / "checkpoint-1"), model=extra, optimizer=torch.optim.AdamW(extra.parameters()),
                        rank=0)


def test_a_checkpoint_that_fails_inside_dcp_is_a_checkpoint_error(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    _save(tmp_path, 1)

    def failing_load(*args, **kwargs):
        raise CheckpointException("load failed", {0: (ValueError("Size mismatch for model.x\nmore"), None)})

    monkeypatch.setattr(ckpt.dcp, "load", failing_load)
    model, optimizer = _model(0)
    with pytest.raises(CheckpointError, match=r"checkpoint-1 does not load into this model and optimizer: "
                                              r"ValueError: Size mismatch for model.x$"):
        load_checkpoint(str(tmp_path / "checkpoint-1"), model=model, optimizer=optimizer, rank=0)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    """A whole checkpoint folder replaced by another run's (its manifest valid): resume falls back to
    this run's newest, naming the other one; the run keeps its id."""
    options = dict(max_steps=2, save_every=1)
    first = _trainer(tmp_path / "a", **options)
    first.train()
    _trainer(tmp_path / "b", max_steps=2).train()  # another run's checkpoint-2
    shutil.rmtree(tmp_path / "a" / "checkpoint-2")
    shutil.copytree(tmp_path / "b" / "checkpoint-2", tmp_path / "a" / "checkpoint-2")
    capsys.readouterr()
    resumed = _trainer(tmp_path / "a", resume=True, **options)
    out = capsys.readouterr().out
    assert resumed.step == 1 and resumed.run_id == first.run_id
    assert "checkpoint-2: written by run" in out and "not this output_dir's run" in out and "falling back to" in out
    resumed.train()  # step 2 again: the other run's checkpoint-2 is set aside, not deleted
    assert [n for n in os.listdir(tmp_path / "a") if n.startswith("checkpoint-2.kept")]
    assert ckpt.read_manifest(str(tmp_path / "a" / "checkpoint-2"))["run_id"] == first.run_id


def test_resume_with_another_model_is_one_clear_error(tmp_path):
    from grpo_kernels.demo import build_model, build_tokenizer

    _trainer(tmp_path, max_steps=1).train()
    tokenizer = build_tokenizer()
    with pytest.raises(CheckpointError, match=r"checkpoint-1 holds another model than this one \(resumed with "
                                              r"another --model\?\): \d+ parameters differ in shape, e\.g\. "
                                              r".*embed_tokens.weight: \[15, 32\] in the checkpoint, \[15, 64\] here"):
        _trainer(tmp_path, model=build_model(tokenizer, hidden_size=64), tokenizer=tokenizer, max_steps=1, resume=True)


def _unwritable_directory(tmp_path):
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if not os.access(directory, os.W_OK):
        return directory
    for candidate in ("/sys/kernel", "/sys"):  # root writes anywhere but here
        try:
            fd, probe = __import__("tempfile").mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.remove(probe)
    pytest.skip("no directory this user cannot write to")


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from grpo_kernels.train import GRPOConfig, GRPOTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    output_dir = _unwritable_directory(tmp_path)
    (tmp_path / "not-a-model").mkdir()  # loading it would be another error: it is never loaded
    config = GRPOConfig(model=str(tmp_path / "not-a-model"), dataset=str(tmp_path / "rows.jsonl"),
                        output_dir=str(output_dir))
    with pytest.raises(ConfigError, match=rf"output_dir {output_dir} is not writable"):
        GRPOTrainer(config)


def test_a_latest_that_is_not_a_file_is_refused_and_kept(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "notes.txt").write_text("mine")
    for options in (dict(resume=True), dict(overwrite_output_dir=True), {}):
        with pytest.raises(ConfigError, match=r"latest is a directory, not the trainer's `latest` file: move it"):
            _trainer(tmp_path, **options)
    assert (tmp_path / "latest" / "notes.txt").read_text() == "mine"


def test_overwrite_removes_a_symlinked_checkpoint_without_following_it(tmp_path, capsys):
    run = tmp_path / "run"
    _save(run, 1)
    _save(tmp_path / "elsewhere", 3, run_id="elsewhere")
    os.symlink(tmp_path / "elsewhere" / "checkpoint-3", run / "checkpoint-3")
    trainer = _trainer(run, max_steps=1, overwrite_output_dir=True)
    assert not os.path.lexists(run / "checkpoint-3") and not (run / "checkpoint-1").exists()
    verify_checkpoint(str(tmp_path / "elsewhere" / "checkpoint-3"))  # the link's target is untouched
    assert "checkpoint-3 (a symbolic link: removed the link, not" in capsys.readouterr().out
    trainer.train()


def test_overwrite_deletes_nothing_when_one_entry_cannot_go(tmp_path, monkeypatch):
    for step in (1, 2):
        _save(tmp_path, step)
    real_rename = os.rename
    calls = []

    def rename(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", source)
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ConfigError, match=r"overwrite_output_dir: cannot remove .*Permission denied.*nothing was deleted"):
        _trainer(tmp_path, overwrite_output_dir=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "latest"]
    verify_checkpoint(str(tmp_path / "checkpoint-2"))
