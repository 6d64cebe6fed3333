"""The trainer end to end on tiny models: gradients, resume, divergence, the CLI."""

from __future__ import annotations

import copy
import json
import logging
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from helpers import make_config, past_checkpoint, resume, sft_command, start_until
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli.main import main
from posttrain.common.distributed import DistInfo
from posttrain.config import SFTConfig
from posttrain.data.batching import collate, plan_batches, rank_micro_batches
from posttrain.data.tokenized import load_dataset_for_training
from posttrain.engine.checkpoints import latest_checkpoint
from posttrain.engine.settings import RunSettings
from posttrain.engine.setup import prepare_run
from posttrain.models.policy import ResponseLoss
from posttrain.models.tiny import tiny_causal_lm
from posttrain.sft.method import SFT
from posttrain.sft.train import TrainingError, accumulate_gradients, train

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def step_gradients(model, config: SFTConfig, examples, pad_id: int) -> dict[str, torch.Tensor]:
    plan = plan_batches(
        [len(e.input_ids) for e in examples], config.micro_batch_size, config.grad_accum_steps
    )
    micro = rank_micro_batches(plan[0], config.micro_batch_size)
    batches = [collate([examples[i] for i in ids], pad_id) for ids in micro]
    model.zero_grad(set_to_none=True)
    accumulate_gradients(
        ResponseLoss(model, chunk_size=config.loss_chunk_size),
        batches,
        config.loss_normalization,
        CPU,
        None,
    )
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_gradient_independent_of_micro_batch_split(workdir, tmp_path, normalization) -> None:
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    base = make_config(workdir, tmp_path, loss_normalization=normalization)
    examples, _ = load_dataset_for_training(base.train_file, tokenizer, base.data_format())
    pad = tokenizer.eos_token_id
    one = SFTConfig(**{**base.__dict__, "micro_batch_size": 8, "grad_accum_steps": 1})
    four = SFTConfig(**{**base.__dict__, "micro_batch_size": 2, "grad_accum_steps": 4})
    g1 = step_gradients(model, one, examples, pad)
    g4 = step_gradients(model, four, examples, pad)
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], atol=1e-5, rtol=1e-5, msg=name)


def reference_step_loss(model, batches, normalization: str) -> torch.Tensor:
    """The straightforward loss: full logits, log_softmax, masks, plain means."""
    nll_rows, masks = [], []
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = F.log_softmax(logits.float(), -1).gather(-1, b["labels"][..., None])[..., 0]
        nll_rows.append(-lp * b["response_mask"])
        masks.append(b["response_mask"])
    if normalization == "token":
        return sum(r.sum() for r in nll_rows) / sum(m.sum() for m in masks)
    per_seq = [r.sum(-1) / m.sum(-1) for r, m in zip(nll_rows, masks, strict=True)]
    return torch.cat(per_seq).mean()


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_loss_gradients_match_straightforward_path(
    workdir, tmp_path, llama_tokenizer, normalization, arch
) -> None:
    model = tiny_causal_lm(
        arch, vocab_size=len(llama_tokenizer), hidden_size=32, tie_word_embeddings=arch == "qwen2"
    )
    config = make_config(workdir, tmp_path, loss_normalization=normalization, loss_chunk_size=5)
    examples, _ = load_dataset_for_training(
        config.train_file, llama_tokenizer, config.data_format()
    )
    batches = [collate(examples[:3], 1), collate(examples[3:8], 1)]
    reference = copy.deepcopy(model)
    model.zero_grad()
    accumulate_gradients(
        ResponseLoss(model, chunk_size=config.loss_chunk_size),
        batches,
        config.loss_normalization,
        CPU,
        None,
    )
    reference_step_loss(reference, batches, normalization).backward()
    for (name, p), (_, q) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_train_end_to_end(workdir, tmp_path) -> None:
    out = tmp_path / "run"
    config = make_config(
        workdir,
        out,
        max_steps=12,
        eval_file=str(workdir / "eval.jsonl"),
        eval_every=6,
        lr=1e-2,
        save_every=4,
        keep_last=1,
    )
    result = train(config)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 13))
    for r in train_lines:
        assert {"loss", "lr", "grad_norm", "entropy", "token_accuracy", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 <= r["token_accuracy"] <= 1
    assert [r["step"] for r in eval_lines] == [6, 12]
    for r in eval_lines:
        assert r["eval_perplexity"] == pytest.approx(2.718281828 ** r["eval_loss"], rel=1e-6)
        assert {"eval_entropy", "eval_token_accuracy"} <= set(r)
    assert train_lines[-1]["loss"] < 0.8 * train_lines[0]["loss"]
    assert result.final_loss == train_lines[-1]["loss"]
    assert result.plot_path is not None and result.plot_path.stat().st_size > 0
    # keep_last=1: only the newest periodic checkpoint remains (step 12 is the final model).
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000008"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tokenizer)


def test_run_directory_is_not_reused_by_accident(workdir, tmp_path) -> None:
    config = make_config(workdir, tmp_path / "run", max_steps=1)
    train(config)
    with pytest.raises(ValueError, match="--resume to continue it or --overwrite"):
        train(config)
    train(SFTConfig(**{**config.__dict__, "overwrite": True}))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(workdir, tmp_path) -> None:
    out = tmp_path / "run"
    config = make_config(
        workdir, out, lr=1e30, warmup_steps=0, save_every=1, max_steps=6, lr_scheduler="constant"
    )
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step \d") as info:
        train(config)
    last = latest_checkpoint(out)
    assert last is not None and last.name in str(info.value)
    assert not (out / "final").exists()


def test_resume_after_kill_matches_uninterrupted_run(workdir, tmp_path) -> None:
    settings = {
        "max_steps": 30,
        "save_every": 2,
        "keep_last": 2,
        "micro_batch_size": 8,
        "grad_accum_steps": 1,
    }
    straight = tmp_path / "straight"
    train(make_config(workdir, straight, **settings))

    killed = tmp_path / "killed"
    cmd = sft_command(make_config(workdir, killed, **settings), tmp_path)
    proc = start_until(cmd, lambda: past_checkpoint(killed, "step-000006"), timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()

    resumed = resume(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    want = load_file(straight / "final" / "model.safetensors")
    got = load_file(killed / "final" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    # The resumed metrics continue the file without duplicate steps.
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))


# --------------------------------------------------------------------------- the CLI

# Losses of the first five steps of `posttrain sft` on the fixture data (torch 2.13.0, CPU,
# fp32, one thread). A change here means the trainer computes something else.
PINNED_LOSSES = [5.943212, 5.788528, 5.656681, 5.530269, 5.471233]


def test_cli_sft_pins_losses(workdir, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    rc = main(
        [
            "sft",
            "--model",
            str(workdir / "model"),
            "--train-file",
            str(workdir / "train.jsonl"),
            "--output-dir",
            str(out),
            "--max-steps",
            "5",
            "--micro-batch-size",
            "4",
            "--grad-accum-steps",
            "2",
            "--lr",
            "3e-3",
            "--seed",
            "0",
            "--num-threads",
            "1",
            "--no-progress",
            "--precision",
            "fp32",
        ]
    )
    assert rc == 0
    assert "final loss" in capsys.readouterr().out
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4, abs=1e-5)


def test_cli_help_shows_defaults(capsys) -> None:
    # Every flag and its default is checked in test_config; here, that the CLI wires it up.
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--micro-batch-size" in text and "(default: 4)" in text


def run_cli_error(args: list[str], capsys) -> str:
    rc = main(["sft", *args])
    assert rc == 2
    return capsys.readouterr().err


def test_cli_errors_are_clear(workdir, tmp_path, capsys) -> None:
    model, data = str(workdir / "model"), str(workdir / "train.jsonl")
    out = str(tmp_path / "o")
    err = run_cli_error(
        ["--model", str(tmp_path / "nope"), "--train-file", data, "--output-dir", out], capsys
    )
    assert "nope" in err and "does not exist" in err

    err = run_cli_error(
        ["--model", model, "--train-file", str(tmp_path / "missing.jsonl"), "--output-dir", out],
        capsys,
    )
    assert "missing.jsonl" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    err = run_cli_error(["--model", model, "--train-file", str(bad), "--output-dir", out], capsys)
    assert "bad.jsonl:3" in err

    fields = tmp_path / "fields.jsonl"
    fields.write_text('{"question": "a", "answer": "b"}\n')
    err = run_cli_error(
        ["--model", model, "--train-file", str(fields), "--output-dir", out], capsys
    )
    assert "question" in err and "answer" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = run_cli_error(["--model", model, "--train-file", str(empty), "--output-dir", out], capsys)
    assert "empty" in err.lower() or "no examples" in err.lower()

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model}\ntrain_file: {data}\nmicro_batch: 4\n")
    err = run_cli_error(["--config", str(cfg)], capsys)
    assert "micro_batch_size" in err


def test_gradient_checkpointing_gives_the_same_gradients(workdir, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    config = make_config(workdir, tmp_path)
    examples, _ = load_dataset_for_training(config.train_file, tokenizer, config.data_format())
    plain = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    checkpointed.train()
    plain.train()
    want = step_gradients(plain, config, examples, tokenizer.eos_token_id)
    got = step_gradients(checkpointed, config, examples, tokenizer.eos_token_id)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_run(workdir, tmp_path) -> None:
    result = train(
        make_config(
            workdir,
            tmp_path / "bf16",
            precision="bf16",
            max_steps=4,
            gradient_checkpointing=True,
            head_matmul_dtype="bf16",
        )
    )
    losses = [json.loads(x)["loss"] for x in result.metrics_path.read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_glued_prompts_and_responses_are_warned_about_at_start(workdir, tmp_path, caplog) -> None:
    # "Answer: " + "42" is trained as " " then "42" but reads as " 42" at inference.
    rows = [{"prompt": f"Question: What is {i} + 30? Answer: ", "response": "42"} for i in range(8)]
    data = tmp_path / "glued.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = make_config(workdir, tmp_path / "run", train_file=str(data), max_steps=1)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        train(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("8 of 8" in w and f"{data}:1" in w for w in warnings), warnings


def test_eval_file_alone_is_used_at_the_end_and_announced(
    workdir, tmp_path, caplog, capsys, monkeypatch
) -> None:
    monkeypatch.setattr("posttrain.engine.metrics.STATUS_EVERY_S", 0.0)
    eval_file = workdir / "eval.jsonl"
    config = make_config(
        workdir, tmp_path / "run", max_steps=3, eval_file=str(eval_file), eval_limit=5
    )
    with caplog.at_level(logging.INFO, logger="posttrain"):
        train(SFTConfig(**{**config.__dict__, "progress": True}))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"evaluation: response-token loss on 5 examples of {eval_file}, at the end" in said
    assert "eval 5/5" in capsys.readouterr().out  # progress while evaluating
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3]

    # --eval-limit N is the first N examples, the same every time.
    first_five = tmp_path / "first_five.jsonl"
    first_five.write_text("".join(eval_file.read_text().splitlines(True)[:5]))
    train(make_config(workdir, tmp_path / "five", max_steps=3, eval_file=str(first_five)))
    five = [json.loads(x) for x in (tmp_path / "five" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in five if "eval_loss" in r] == evals


def test_bf16_head_weight_is_cast_once_per_step(workdir, tmp_path) -> None:
    # The narrowed head weight serves every micro-batch of a step, and is dropped at
    # the optimizer step so that the next step never sees the old weights.
    config = make_config(workdir, tmp_path / "run", head_matmul_dtype="bf16", max_steps=2, lr=1e-2)
    method = SFT(config)
    run = prepare_run(method, RunSettings.of(config), CPU)
    workspace = run.policy.workspace
    for step in range(2):
        batches = method.data.batches(step)
        assert len(batches) == config.grad_accum_steps
        sums = accumulate_gradients(run.module, batches, config.loss_normalization, CPU, None)
        cast = workspace.cast("head_weight", run.model.lm_head.weight, torch.bfloat16)
        assert workspace.is_cached("head_weight")
        run.optimizer_step(sums.all_reduced(CPU)["loss"], step + 1)
        assert not workspace.is_cached("head_weight")
        fresh = workspace.cast("head_weight", run.model.lm_head.weight, torch.bfloat16)
        assert not torch.equal(fresh, cast)  # the step changed the weights
        workspace.forget_casts()
