"""`tilt demo` end to end on a tiny model (the real demo uses the embedded 135M model: `make demo`)."""
import json

import pytest

from tilt.cli import main
from tilt.pipelines.demo import demo_prompts
from tilt.engine.tiny import char_tokenizer, tiny_gpt2


def test_demo_prompts_ship_with_the_package():
    prompts = demo_prompts()
    assert len(prompts) == 32 and len(set(prompts)) == 32 and all(p.strip() for p in prompts)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tok = char_tokenizer()
    tiny_gpt2(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    run = tmp_path / "run"
    assert main(["demo", "--model", str(folder), "--steps", "2", "--run-dir", str(run), "--eval-samples", "2", "--evals", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("mean reward", "KL(pi || pi_ref)", "win rate against pi_ref", "before (", "after  (", "Report:"):
        assert text in out, text
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    steps = {json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()}
    assert steps == {0, 2}
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2] and "Reward and win rate as KL grows" in out
    assert (run / "report" / "report.html").is_file() and (run / "final" / "config.json").is_file()
