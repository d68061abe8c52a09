"""Sampling throughput: tilt's engine against ``model.generate`` on the same model, batch and length.

Prints new tokens per second of both and their ratio, measured side by side (A B A B ...) in one run, with
the load average next to each pair. Not a test: the verdict is the printed ratio.

``--sampler`` names tilt's samplers to time (``SamplingConfig.sampler``: exact, int8, int8-smooth, fp16, bf16,
auto); each is interleaved with ``generate`` in every round, and the fast samplers' copy-refresh time (one
re-quantisation or cast of the weights, what a training step pays once) and how far their proposal q is from the
model (KL(q || pi) per token, from the samples drawn) are printed with them.

    python benchmarks/sampling.py                      # tiny Llama, batches 16 and 64
    python benchmarks/sampling.py --model PATH --batch 16 --new-tokens 32
    python benchmarks/sampling.py --samples-per-prompt 4   # B/4 prompts x 4 samples (generate gets each prompt 4 times)
    python benchmarks/sampling.py --model embedded --batch 16 --repeats 1
    python benchmarks/sampling.py --model embedded --batch 16 --sampler exact int8

--model takes a folder or ``embedded`` (tilt.engine.loading).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def generate_tokens_per_s(model, prompt_ids, prompt_mask, new_tokens, pad_id, eos_id):
    start = time.perf_counter()
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    seconds = time.perf_counter() - start
    return (out.shape[1] - prompt_ids.shape[1]) * out.shape[0] / seconds


def tilt_tokens_per_s(policy, prompts, samples_per_prompt, generator):
    """(tokens/s of one ``sample`` call, KL(q || pi) per token of its samples: 0 for the exact sampler, else the mean
    of log q - log pi over its tokens, pi scored by one full pass outside the timing)."""
    start = time.perf_counter()
    rollout = policy.sample(prompts, samples_per_prompt, generator=generator)
    seconds = time.perf_counter() - start
    kl = 0.0
    if rollout.from_proposal:
        with torch.no_grad():
            log_pi = policy.token_logprobs(rollout)
        kl = ((rollout.sample_token_logprobs - log_pi)[rollout.completion_mask].mean().item())
    return rollout.completion_ids.numel() / seconds, kl


def refresh_seconds(policy) -> float:
    """Time of one refresh of the policy's sampler copy from its weights (0 for the exact sampler)."""
    if policy.fast_sampler is None:
        return 0.0
    return policy.fast_sampler.refresh(policy.model)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model folder (default: a tiny Llama built from a config)")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples-per-prompt", type=int, default=1, help="K: tilt gets B/K prompts and K samples of each")
    ap.add_argument("--sampler", nargs="+", default=["exact"], help="tilt samplers to time: exact, int8, int8-smooth, fp16, bf16, auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common

    print(common.machine_line())

    from tilt.engine.hf import HFPolicy, SamplingConfig

    if args.model:
        from tilt.engine.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model)
    else:
        from tilt.engine.tiny import char_tokenizer, tiny_llama

        tokenizer = char_tokenizer()
        model = tiny_llama(32000)  # a realistic vocabulary makes the LM head and sampling cost what they do in practice
    # EOS is suppressed in both engines' timing by forcing full-length completions: same token counts.
    policies = {}
    for name in args.sampler:
        policies[name] = HFPolicy(model, tokenizer, SamplingConfig(max_new_tokens=args.new_tokens, sampler=name))
        policies[name].eos_ids = [-1]  # never stop early, like min_new_tokens in generate
    eos_id = tokenizer.eos_token_id
    print(f"{args.threads} threads, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.new_tokens} new tokens, {args.samples_per_prompt} sample(s) per prompt; samplers "
          + ", ".join(f"{name} -> {p.sampler_kind} ({p.sampler_reason})" for name, p in policies.items()))
    print(f"{'batch':>5}  {'sampler':>11}  {'generate tok/s':>14}  {'tilt tok/s':>10}  {'ratio':>6}  {'refresh s':>9}  "
          f"{'KL(q||pi)/t':>11}  load average")
    for batch in args.batch:
        k = args.samples_per_prompt
        prompts = [("the cat sat on the mat " * (1 + i % 3)).strip() for i in range(batch // k)]
        prompt_ids, prompt_mask = next(iter(policies.values())).encode_prompts([p for p in prompts for _ in range(k)])
        rates = {name: ([], [], [], [], []) for name in policies}  # generate, tilt, refresh, load, KL(q || pi) per token
        for r in range(args.repeats + 1):  # first round warms up (and builds the copies)
            for name, policy in policies.items():  # generate and each sampler interleaved: A B A C A B A C ...
                torch.manual_seed(r)
                g = generate_tokens_per_s(model, prompt_ids, prompt_mask, args.new_tokens, tokenizer.pad_token_id, eos_id)
                t, kl = tilt_tokens_per_s(policy, prompts, k, torch.Generator().manual_seed(r))
                if r:
                    for values, x in zip(rates[name], (g, t, refresh_seconds(policy), os.getloadavg()[0], kl)):
                        values.append(x)
        for name, (gs, ts, refresh, loads, kls) in rates.items():
            g, t = statistics.median(gs), statistics.median(ts)
            print(f"{batch:>5}  {name:>11}  {g:>14.0f}  {t:>10.0f}  {t / g:>6.2f}  {statistics.median(refresh):>9.3f}  "
                  f"{statistics.mean(kls):>11.4f}  {' '.join(f'{x:.2f}' for x in loads)}", flush=True)


if __name__ == "__main__":
    main()
