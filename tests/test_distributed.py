"""Recipes under torch.distributed: 2 processes on CPU (gloo), launched by torchrun, against 1 process.

The multi-process tests share three launches of tests/dist_worker.py (each launch costs seconds of imports per
process), made once by a fixture:
  1. uninterrupted KL-RL (DDP), DPO (DDP), KL-RL (FSDP2) and every other recipe (BC, reward model, DPG on-policy and
     adaptive, online DPO, XPO; replicated); then a copy of the KL-RL (DDP) job in which rank 1 is
     killed with SIGKILL in the middle of step 2 (the launch fails);
  2. that copy relaunched with resume; then a copy of the KL-RL (FSDP2) job killed the same way;
  3. the FSDP2 copy relaunched with resume;
  4. the error cases (ranks with different configs, a rank that dies; the launch fails). gloo sometimes aborts the
     surviving rank from its own I/O thread when the peer's socket closes (SIGABRT, before Python sees an error);
     that launch is retried, at most three times, until the surviving rank gets to report.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tilt import distributed
from tilt.recipes import dpo, kl_rl
from tilt.recipes.common import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dist_worker", ROOT / "tests" / "dist_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


# --- single process: no process group, identity helpers -------------------------------------------------------------
def test_single_process_creates_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init(timeout_s=1) is False
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init(timeout_s=1) is False and not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.randn(3)
    assert distributed.all_gather_cat(x)[0] is x
    assert distributed.all_sum([1.5, 2.0]) == [1.5, 2.0] and distributed.all_sum_int(7) == 7
    distributed.check_same_config({"a": 1})  # nothing to compare with


def test_shards_are_contiguous_equal_and_cover_the_step():
    shards = [distributed.shard_positions(6, r, 3) for r in range(3)]
    assert [list(s) for s in shards] == [[0, 1], [2, 3], [4, 5]]
    assert list(distributed.shard_positions(4, 0, 1)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot be split evenly over 4 processes: use a multiple of 4 \\(e.g. 8\\)"):
        distributed.shard_positions(6, 0, 4)


def test_config_hash_sees_every_field():
    base = {"recipe": "kl_rl", **kl_rl.config_dict(kl_rl.KLRLConfig())}
    assert distributed.config_hash(base) == distributed.config_hash(dict(reversed(list(base.items()))))
    assert distributed.config_hash(base) != distributed.config_hash({**base, "lr": base["lr"] * 2})


def test_single_process_checkpoint_resumes_exactly(tmp_path):
    """save_checkpoint / load_checkpoint (torch.distributed.checkpoint) without a process group."""
    config, policy, ref, tok = worker.build_kl_rl()
    history = []
    kl_rl.train(config, policy, ref, worker.share_of_a, worker.PROMPTS, on_step=lambda s, m: history.append(m["loss"]))

    config, policy, ref, tok = worker.build_kl_rl()
    optimizer = build_optimizer("adamw", policy.parameters(), config.lr)
    first = []

    def save(step, metrics):
        first.append(metrics["loss"])
        distributed.save_checkpoint(tmp_path, step + 1, policy.model, optimizer)

    kl_rl.train(kl_rl.KLRLConfig(**{**kl_rl.config_dict(config), "steps": 2}), policy, ref, worker.share_of_a, worker.PROMPTS,
                optimizer=optimizer, on_step=save)
    config, policy2, ref, tok = worker.build_kl_rl()
    optimizer = build_optimizer("adamw", policy2.parameters(), config.lr)
    state = distributed.load_checkpoint(distributed.latest_checkpoint(tmp_path), policy2.model, optimizer)
    assert state["step"] == 2 and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001", "step-00000002"]
    rest = []
    kl_rl.train(config, policy2, ref, worker.share_of_a, worker.PROMPTS, optimizer=optimizer, start_step=2,
                on_step=lambda s, m: rest.append(m["loss"]))
    assert first + rest == history  # the uninterrupted run's losses, bit for bit
    config, whole, ref, tok = worker.build_kl_rl()
    kl_rl.train(config, whole, ref, worker.share_of_a, worker.PROMPTS)
    for name, w in whole.model.state_dict().items():
        assert torch.equal(w, policy2.model.state_dict()[name]), name


# --- two processes -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *jobs: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "dist_worker.py"), str(out), *jobs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TILT_DIST_TIMEOUT_S": "20", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def launch_completed(out: Path, job: str, folder: Path, tries: int = 3) -> subprocess.CompletedProcess:
    """Launch one job that should succeed, again from the same starting folder when gloo aborted the launch at exit
    (seen once in CI, after every output of the run was written; not reproduced in 26 launches of that job, quiet or
    under load). An abort that comes back every time still fails the test, as does any other failure."""
    start = folder.with_name(folder.name + "-before")
    shutil.copytree(folder, start)
    for _ in range(tries):
        result = launch(out, job)
        if "(SIGABRT)" not in result.stderr:
            break
        shutil.rmtree(folder)
        shutil.copytree(start, folder)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    others = [f"other:{recipe}" for recipe in worker.OTHER]
    results = {"first": launch(out, "kl_rl:ddp", "dpo:ddp", "kl_rl:fsdp", *others, "kl_rl:ddp:crash2", timeout=400)}
    results["second"] = launch(out, "kl_rl:ddp:resume", "kl_rl:fsdp:crash2")
    results["third"] = launch_completed(out, "kl_rl:fsdp:resume", folder=out / "kl_rl-fsdp-restarted")
    for _ in range(3):
        results["errors"] = launch(out, "errors")
        if "(SIGABRT)" not in results["errors"].stderr:
            break
    return out, results


def read_run(folder: Path):
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((folder / "result.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder / "final")
    return rows, result, model.state_dict()


def assert_close_weights(exported: dict, model: torch.nn.Module):
    for name, w in model.state_dict().items():
        torch.testing.assert_close(exported[name], w, rtol=1e-4, atol=1e-4, msg=name)


def single_process_kl_rl():
    config, policy, ref, tok = worker.build_kl_rl()
    history = []
    kl_rl.train(config, policy, ref, worker.share_of_a, worker.PROMPTS, on_step=lambda s, m: history.append(m))
    return history, policy.model


def killed(proc: subprocess.CompletedProcess) -> bool:
    """The launch failed because a rank was killed by SIGKILL (torchrun reports it, then exits with 1)."""
    return proc.returncode != 0 and "(SIGKILL)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_processes_match_one_kl_rl_and_dpo(runs):
    out, results = runs
    assert killed(results["first"]), results["first"].stderr[-3000:]  # the launch ends with a killed job
    history, model = single_process_kl_rl()
    for mode in ("ddp", "fsdp"):  # FSDP2: sharded weights, gathered for sampling, exported to from_pretrained
        rows, result, weights = read_run(out / f"kl_rl-{mode}")
        assert result == {"world_size": 2, "start_step": 0}
        assert [r["step"] for r in rows] == list(range(len(history)))
        for key in ("loss", "reward", "reward_std", "kl_ref", "completion_length", "target_ess", "grad_norm"):
            assert [r[key] for r in rows] == pytest.approx([m[key] for m in history], rel=1e-4, abs=1e-6), (mode, key)
        assert_close_weights(weights, model)

    config, policy, ref, tok = worker.build_kl_rl()
    dpo_config, pairs = worker.build_dpo(policy)
    dpo_history = []
    dpo.train(dpo_config, policy, ref, pairs, on_step=lambda s, m: dpo_history.append(m))
    rows, result, weights = read_run(out / "dpo-ddp")
    assert result["world_size"] == 2 and len(rows) == len(dpo_history) == 4
    for key in ("loss", "reward_margin", "accuracy"):
        assert [r[key] for r in rows] == pytest.approx([m[key] for m in dpo_history], rel=1e-4, abs=1e-6), key
    assert_close_weights(weights, policy.model)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", worker.OTHER)
def test_two_processes_match_one_for_every_other_recipe(runs, recipe):
    """BC, reward modelling, DPG (running log Z and proposal decisions shared by the ranks), online DPO and XPO (labels
    drawn as in one process): the 2-process run logs the 1-process metrics and trains the same weights."""
    out, results = runs
    folder = out / f"other-{recipe}"
    assert json.loads((folder / "result.json").read_text()) == {"world_size": 2}, results["first"].stderr[-3000:]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    history = []
    model, initial = worker.train_other(recipe, lambda step, metrics: history.append({"step": step, **metrics}))
    assert max((w - initial[k]).abs().max().item() for k, w in model.state_dict().items()) > 1e-3  # it did train
    assert len(rows) == len(history) >= 4
    for row, expected in zip(rows, history):
        assert set(row) == set(expected), recipe
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (recipe, row["step"], key)
    from safetensors.torch import load_file

    weights = load_file(str(folder / "final.safetensors"))
    assert_close_weights(weights, model)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_kill_minus_9_then_resume_reproduces_the_uninterrupted_run(runs, mode):
    out, results = runs
    crashed = results["first"] if mode == "ddp" else results["second"]
    assert killed(crashed), crashed.stderr[-3000:]
    whole_rows, whole_result, whole = read_run(out / f"kl_rl-{mode}")
    rows, result, resumed = read_run(out / f"kl_rl-{mode}-restarted")
    assert result == {"world_size": 2, "start_step": 2}  # it did resume, from the checkpoint of 2 steps
    assert rows == whole_rows  # every metric of every step, bit for bit
    for name, w in whole.items():
        assert torch.equal(resumed[name], w), name


@pytest.mark.slow
def test_clear_errors_when_configs_differ_or_a_rank_dies(runs):
    out, results = runs
    assert results["third"].returncode == 0, results["third"].stderr[-3000:]
    assert results["errors"].returncode != 0 and "exitcode  : 3" in results["errors"].stderr, results["errors"].stderr[-3000:]
    for r in (0, 1):
        text = (out / f"mismatch-rank{r}.txt").read_text()
        assert f"rank {r}: the ranks were launched with different configs" in text and "ranks [1] differ from rank 0" in text
    died = (out / "died-rank0.txt").read_text()
    assert "rank 0 of 2: an all-reduce of metrics failed" in died and "Another rank has died" in died


def test_a_rank_that_never_arrives_fails_within_the_timeout(monkeypatch):
    """Rank 0 of 2 alone: the rendezvous gives up after the finite timeout with a clear error."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.RankFailure, match="could not join the process group of 2 processes within 1 s"):
        distributed.init(timeout_s=1, backend="gloo")
    assert not dist.is_initialized()


def test_the_command_line_reports_a_dead_peer_and_exits_3_without_teardown():
    code = ("import types\nfrom tilt.cli.output import run_parsed\nfrom tilt.distributed import RankFailure\n"
            "def run(args):\n    raise RankFailure('rank 0 of 2: an all-reduce of metrics failed')\n"
            "run_parsed(types.SimpleNamespace(run=run))\nprint('teardown reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "tilt: error: rank 0 of 2: an all-reduce of metrics failed" in proc.stderr
    assert "teardown reached" not in proc.stdout


# --- tilt train under torchrun: the run layer's wiring (replicate + DDP, rank 0 writes, barriers) ---------------------
def torchrun_tilt(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 --no-python tilt ARGS`` (gloo on CPU) in ``cwd``."""
    tilt = Path(sys.executable).parent / "tilt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--no-python", str(tilt), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TILT_DIST_TIMEOUT_S": "20", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(cwd))


@pytest.mark.slow
def test_tilt_train_dpo_under_torchrun_writes_the_one_process_run(tmp_path):
    """`torchrun --nproc_per_node 2 --no-python tilt train dpo` (gloo, CPU) gives the one-process run's metrics.jsonl and
    final model; the summary records the world size."""
    import yaml
    from safetensors.torch import load_file

    from tilt.cli import main
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2
    from tilt.runs import directory as runs

    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=3).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"prompt": p, "chosen": " aei" + p, "rejected": " bcd"} for p in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # float32: the comparison is to float32 rounding; under bfloat16 autocast (dtype auto on a CPU with native
    # bfloat16) a batch of 4 and two of 2 round differently, 1.8e-4 relative in the loss
    config = {"run": {"model": "model", "preferences": "pairs.jsonl", "checkpoint_every": 1, "device": "cpu", "dtype": "float32"},
              "dpo": {"epochs": 1, "pairs_per_step": 4, "lr": "1e-2"}}  # 2 steps of 4 pairs, 2 per rank
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "dpo", "--config", str(tmp_path / "dpo.yaml"), "--run-dir", str(one), "--json"]) == 0
    done = torchrun_tilt(tmp_path, "train", "dpo", "--config", str(tmp_path / "dpo.yaml"), "--run-dir", str(two), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one JSON object: rank 0's summary (rank 1 prints nothing)
    assert summary["world_size"] == 2 and summary["steps"] == 2
    single, double = runs.read_jsonl(one / "metrics.jsonl"), runs.read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in double] == [r["step"] for r in single] == [1, 2]
    for a, b in zip(single, double):
        assert a.keys() == b.keys()
        for key in a:
            if key != "step_time":  # wall clock
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert [s for s, _ in runs.list_checkpoints(two)] == [1, 2]  # rank 0 wrote every checkpoint, once
    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_tilt_train_demo_rl_under_torchrun_writes_the_one_process_run(tmp_path, monkeypatch):
    """The demo-rl pipeline (behaviour cloning, then KL-RL toward the clone, evaluations before and after) on two
    processes: every stage's metrics and the final evaluation equal the one-process run's (to 1e-4)."""
    from tilt.cli import main
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2
    from tilt.runs import directory as runs

    tok = char_tokenizer()
    tiny_gpt2(len(tok)).save_pretrained(tmp_path / "tiny-model")  # the example's model folder, as the README makes it
    tok.save_pretrained(tmp_path / "tiny-model")
    args = ["train", "demo-rl", "--config", str(ROOT / "examples" / "demo_rl_tiny.yaml"), "--bc.steps", "4", "--rl.steps", "2",
            "--eval.samples_per_prompt", "2", "--json"]
    monkeypatch.chdir(tmp_path)  # the example names tiny-model relative to the working directory
    assert main([*args, "--run-dir", str(tmp_path / "one")]) == 0
    done = torchrun_tilt(tmp_path, *args, "--run-dir", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["world_size"] == 2
    one = json.loads((tmp_path / "one" / "stages" / "rl" / "stage.json").read_text())
    for stage, steps in (("bc", 4), ("rl", 2)):
        single = runs.read_jsonl(tmp_path / "one" / "stages" / stage / "metrics.jsonl")
        double = runs.read_jsonl(tmp_path / "two" / "stages" / stage / "metrics.jsonl")
        assert [r["step"] for r in double] == [r["step"] for r in single] == list(range(1, steps + 1))
        for a, b in zip(single, double):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), stage
    assert summary["stages"]["rl"]["kl_clone"] == pytest.approx(one["kl_clone"], rel=1e-4, abs=1e-6)
    assert summary["stages"]["rl"]["reward"] == pytest.approx(one["reward"], rel=1e-4, abs=1e-6)
