"""LoRA (peft) in the trainer: targets, exact gradients through the fused loss and the lean
log-probs, the adapter checkpoint/final layout, merging, adapter directories, resume."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
from pathlib import Path

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
from posttrain.engine.checkpoints import checkpoint_dir, latest_checkpoint
from posttrain.models.loading import load_pretrained
from posttrain.models.lora import (
    LoraSettings,
    PeftUnavailable,
    apply_lora,
    attach_adapter,
    require_peft,
    resolve_target_modules,
)
from posttrain.models.policy import ResponseLoss
from posttrain.models.tiny import tiny_causal_lm
from posttrain.primitives import get_response_log_probs, lean_response_log_probs
from posttrain.sft.train import TrainingError, accumulate_gradients, train

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BODY_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def lora_model(arch: str, vocab: int, seed: int = 0, **settings: object) -> torch.nn.Module:
    """A tiny model with LoRA (no dropout) whose B matrices are random, not zero, so the
    adapters change the output and every adapter weight gets a gradient."""
    model = tiny_causal_lm(
        arch, vocab_size=vocab, hidden_size=32, tie_word_embeddings=arch == "qwen2", seed=seed
    )
    model = apply_lora(model, LoraSettings(r=4, dropout=0.0, **settings), log=False)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def fixture_batches(workdir: Path, tokenizer, sizes: tuple[int, ...] = (3, 5)):
    config = make_config(workdir, workdir)
    examples, _ = load_dataset_for_training(config.train_file, tokenizer, config.data_format())
    batches, start = [], 0
    for size in sizes:
        batches.append(collate(examples[start : start + size], tokenizer.eos_token_id))
        start += size
    return batches


# --------------------------------------------------------------------------- targets, peft


def test_all_linear_is_the_body_and_names_are_checked(tiny_llama) -> None:
    assert resolve_target_modules(tiny_llama, "all-linear") == BODY_LINEAR
    # The head and embeddings only when named; names match a layer or its last parts.
    assert resolve_target_modules(tiny_llama, "all-linear, lm_head") == [*BODY_LINEAR, "lm_head"]
    assert resolve_target_modules(tiny_llama, "q_proj,v_proj") == ["q_proj", "v_proj"]
    assert resolve_target_modules(tiny_llama, "self_attn.q_proj") == ["self_attn.q_proj"]
    with pytest.raises(ValueError, match="'qproj' matches no linear or embedding layer") as info:
        resolve_target_modules(tiny_llama, "q_proj,qproj")
    message = str(info.value)
    assert "q_proj" in message and "lm_head" in message and "embed_tokens" in message
    with pytest.raises(ValueError, match="'mlp' matches no linear"):
        resolve_target_modules(tiny_llama, "mlp")


def test_apply_lora_freezes_the_base_and_starts_as_the_base(tiny_llama, caplog) -> None:
    import copy

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    base = copy.deepcopy(tiny_llama)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        model = apply_lora(base, LoraSettings(r=4, target_modules="q_proj,v_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, q and v, 2 layers
    # Each adapter is A (4 x 32) + B (32 x 4) = 256 weights.
    assert "on 4 layers (q_proj, v_proj): 1,024 trainable of" in caplog.text
    # B starts at zero: the wrapped model computes the base model's logits.
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits)


def test_lora_without_peft_says_what_to_install(workdir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(PeftUnavailable, match=r"pip install 'posttrain\[lora\]'"):
        require_peft()
    args = ["sft", "--model", str(workdir / "model"), "--train-file", str(workdir / "train.jsonl")]
    rc = main([*args, "--output-dir", str(tmp_path / "o"), "--lora-r", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        "posttrain sft: error: LoRA needs the peft package, which is not installed: "
        "pip install 'posttrain[lora]'"
    ]
    # lora_r 0 is full fine-tuning: the other LoRA settings are inert, peft is not needed.
    config = make_config(
        workdir,
        tmp_path / "full",
        max_steps=1,
        lora_r=0,
        lora_alpha=8.0,
        lora_dropout=0.2,
        lora_target_modules="nothing_like_this",
    )
    result = train(config)
    assert (result.final_model_dir / "model.safetensors").is_file()


# --------------------------------------------------------------------------- exact gradients


def reference_step_loss(model, batches) -> torch.Tensor:
    """Token-normalised response NLL from the model's own full logits, written out."""
    total, count = 0.0, 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = F.log_softmax(logits.float(), -1).gather(-1, b["labels"][..., None])[..., 0]
        total = total + (-lp * b["response_mask"]).sum()
        count += float(b["response_mask"].sum())
    return total / count


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_lora_gradients_match_full_logits(
    workdir, llama_tokenizer, monkeypatch, arch
) -> None:
    import posttrain.ops.fused_nll as fused_nll

    model = lora_model(arch, len(llama_tokenizer))
    batches = fixture_batches(workdir, llama_tokenizer)
    loss_module = ResponseLoss(model, chunk_size=5)
    assert loss_module.head is not None  # the fused path, not the full-logits fallback
    needs = []
    real_forward = fused_nll.fused_nll_forward

    def spy(*args):
        needs.append(args[7])  # (hidden, weight, bias, labels, weights, spec, dtype, need, ...)
        return real_forward(*args)

    monkeypatch.setattr(fused_nll, "fused_nll_forward", spy)
    accumulate_gradients(loss_module, batches, "token", CPU, None)
    # The head is frozen: the kernel computes the hidden-state gradient only.
    assert needs == [(True, False, False)] * len(batches)
    fused = lora_grads(model)
    assert len(fused) == 2 * 7 * 2 and all(g.abs().sum() > 0 for g in fused.values())
    model.zero_grad(set_to_none=True)
    reference_step_loss(model, batches).backward()
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(fused[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_log_probs_on_a_peft_model(workdir, llama_tokenizer, caplog, arch) -> None:
    model = lora_model(arch, len(llama_tokenizer))
    (batch,) = fixture_batches(workdir, llama_tokenizer, sizes=(4,))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    # The lean path serves the peft model itself (None would mean a fallback).
    assert lean_response_log_probs(model, ids, labels, attention_mask=mask) is not None
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        lean = get_response_log_probs(model, ids, labels, True, attention_mask=mask, chunk_size=7)
    assert "full-logits path" not in caplog.text
    (lean["log_probs"].sum() + 0.1 * lean["token_entropy"].sum()).backward()
    lean_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    full = get_response_log_probs(model, ids, labels, True, attention_mask=mask, lean=False)
    (full["log_probs"].sum() + 0.1 * full["token_entropy"].sum()).backward()
    for key in ("log_probs", "token_entropy"):
        torch.testing.assert_close(lean[key], full[key], atol=1e-5, rtol=1e-5, msg=key)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(lean_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_gradient_independent_of_micro_batch_split(workdir, llama_tokenizer) -> None:
    model = lora_model("llama", len(llama_tokenizer))
    config = make_config(workdir, workdir)
    examples, _ = load_dataset_for_training(
        config.train_file, llama_tokenizer, config.data_format()
    )
    grads = []
    for micro, accum in ((8, 1), (2, 4)):
        plan = plan_batches([len(e.input_ids) for e in examples], micro, accum)
        ids = rank_micro_batches(plan[0], micro)
        batches = [
            collate([examples[i] for i in step], llama_tokenizer.eos_token_id) for step in ids
        ]
        model.zero_grad(set_to_none=True)
        accumulate_gradients(ResponseLoss(model), batches, "token", CPU, None)
        grads.append(lora_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- a LoRA run


@pytest.fixture(scope="module")
def lora_run(workdir, tmp_path_factory) -> Path:
    """A finished 6-step LoRA run with a checkpoint at step 3."""
    out = tmp_path_factory.mktemp("lora") / "run"
    train(make_config(workdir, out, lora_r=4, lr=1e-2, save_every=3, keep_last=5))
    return out


def test_lora_run_layout(workdir, lora_run) -> None:
    step3 = checkpoint_dir(lora_run, 3)
    files = {p.name for p in step3.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    adapter = lora_run / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((workdir / "model").resolve())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == BODY_LINEAR
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2
    assert all(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    # final/ is a plain Hugging Face model: the merged weights, with the tokenizer.
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final")
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "final")
    assert merged.config.vocab_size == len(tokenizer)
    assert not any("lora" in name for name in load_file(lora_run / "final/model.safetensors"))


def test_merged_model_matches_the_adapter_model(workdir, lora_run) -> None:
    ids = torch.tensor([[1, 17, 40, 9, 23, 5, 77, 3]])
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    adapted = attach_adapter(base, lora_run / "final/adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        want = adapted(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=0)
        assert (plain(ids).logits - want).abs().max() > 1e-3  # the adapter did something
        # load_pretrained on the adapter directory merges the same way.
        loaded, _ = load_pretrained(lora_run / "final/adapter", dtype=torch.float32)
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=0)


def test_generate_from_an_adapter_dir(workdir, lora_run, tmp_path, capsys) -> None:
    prompt = ["--prompt", "Reverse: abc ->", "--max-new-tokens", "5", "--device", "cpu"]
    assert main(["generate", "--model", str(lora_run / "final"), *prompt]) == 0
    from_merged = capsys.readouterr().out
    assert main(["generate", "--model", str(lora_run / "final/adapter"), *prompt]) == 0
    assert capsys.readouterr().out == from_merged
    # A LoRA checkpoint is an adapter directory too.
    assert main(["generate", "--model", str(checkpoint_dir(lora_run, 3)), *prompt]) == 0
    capsys.readouterr()

    moved = tmp_path / "adapter"
    shutil.copytree(lora_run / "final/adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(moved), *prompt]) == 2
    err = capsys.readouterr().err
    assert f"is a LoRA adapter of base model '{tmp_path / 'gone'}', which is not a directory" in err


def test_no_merge_lora_keeps_the_adapter_only(workdir, tmp_path) -> None:
    out = tmp_path / "run"
    train(make_config(workdir, out, lora_r=2, max_steps=2, merge_lora=False))
    assert not (out / "final/config.json").exists()
    assert (out / "final/adapter/adapter_model.safetensors").is_file()
    # final/ still loads (its adapter, merged on the fly).
    model, _ = load_pretrained(out / "final")
    assert "lora" not in " ".join(n for n, _ in model.named_parameters())


def test_non_finite_loss_stops_a_lora_run(workdir, tmp_path) -> None:
    out = tmp_path / "run"
    config = make_config(
        workdir,
        out,
        lora_r=4,
        lr=1e30,
        warmup_steps=0,
        save_every=1,
        max_steps=6,
        lr_scheduler="constant",
    )
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step \d") as info:
        train(config)
    last = latest_checkpoint(out)
    assert last is not None and last.name in str(info.value)
    assert not (out / "final").exists()


# --------------------------------------------------------------------------- resume


def test_resume_after_kill_matches_uninterrupted_lora_run(workdir, tmp_path) -> None:
    # Dropout on (the default 0.05): the restored RNG must give the same dropout masks.
    settings = {
        "max_steps": 16,
        "save_every": 2,
        "keep_last": 2,
        "micro_batch_size": 8,
        "grad_accum_steps": 1,
        "lora_r": 4,
        "lr": 1e-2,
    }
    straight = tmp_path / "straight"
    train(make_config(workdir, straight, **settings))

    killed = tmp_path / "killed"
    cmd = sft_command(make_config(workdir, killed, **settings), tmp_path)
    proc = start_until(cmd, lambda: past_checkpoint(killed, "step-000006"), timeout=180)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()

    resumed = resume(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    for name in ("final/adapter/adapter_model.safetensors", "final/model.safetensors"):
        want, got = load_file(straight / name), load_file(killed / name)
        assert set(want) == set(got)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture(scope="module")
def full_run(workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    train(make_config(workdir, out, max_steps=2, save_every=1))
    return out


def resume_into(workdir: Path, checkpoint: Path, out: Path, **overrides: object) -> SFTConfig:
    return make_config(workdir, out, resume_from=str(checkpoint), **overrides)


def test_resuming_lora_and_full_runs_across_kinds_is_refused(
    workdir, lora_run, full_run, tmp_path
) -> None:
    lora_ckpt, full_ckpt = checkpoint_dir(lora_run, 3), checkpoint_dir(full_run, 1)
    # Even --resume-with-changes cannot put an adapter into a full run, or the reverse.
    config = resume_into(workdir, lora_ckpt, tmp_path / "a", resume_with_changes=True)
    with pytest.raises(ValueError, match="is a LoRA checkpoint") as info:
        train(config)
    assert "--lora-r 4 --lora-target-modules all-linear" in str(info.value)
    assert f"--model {lora_ckpt} --output-dir NEW_DIR" in str(info.value)
    config = resume_into(workdir, full_ckpt, tmp_path / "b", lora_r=4)
    with pytest.raises(ValueError, match="is a full fine-tuning checkpoint and this run asks"):
        train(config)
    config = resume_into(workdir, lora_ckpt, tmp_path / "c", lora_r=8, lr=1e-2)
    with pytest.raises(ValueError, match=r"other layers or shapes .*lora_r 4 -> 8"):
        train(config)
    # lora_alpha changes what is trained, not the adapter's shape: refused by default...
    config = resume_into(workdir, lora_ckpt, tmp_path / "d", lora_r=4, lora_alpha=4.0, lr=1e-2)
    with pytest.raises(ValueError, match="changed lora_alpha"):
        train(config)
    # ...and allowed with --resume-with-changes.
    config.resume_with_changes = True
    assert train(config).steps == 6


def test_start_a_new_run_from_a_lora_checkpoint(workdir, lora_run, tmp_path) -> None:
    # --model on an adapter directory: the run starts from the merged model.
    config = make_config(workdir, tmp_path / "new", max_steps=1)
    config.model = str(checkpoint_dir(lora_run, 3))
    assert (train(config).final_model_dir / "model.safetensors").is_file()


def test_gradient_checkpointing_and_bf16_with_lora(workdir, tmp_path) -> None:
    def losses(out: Path, **overrides: object) -> list[float]:
        config = make_config(workdir, out, lora_r=4, lora_dropout=0.0, max_steps=3, **overrides)
        result = train(config)
        return [json.loads(x)["loss"] for x in result.metrics_path.read_text().splitlines()]

    plain = losses(tmp_path / "plain")
    checkpointed = losses(tmp_path / "ckpt", gradient_checkpointing=True)
    assert checkpointed == pytest.approx(plain, abs=1e-6)
    bf16 = losses(tmp_path / "bf16", precision="bf16", gradient_checkpointing=True)
    assert bf16 == pytest.approx(plain, abs=5e-2)


def test_generation_eval_of_a_lora_run_matches_posttrain_eval_of_its_adapter(
    workdir, tmp_path
) -> None:
    out = tmp_path / "run"
    config = make_config(
        workdir,
        out,
        lora_r=4,
        lr=1e-2,
        max_steps=2,
        eval_generate_file=str(workdir / "eval.jsonl"),
        eval_generate_limit=6,
        eval_max_new_tokens=6,
        reward="exact",
    )
    train(config)
    during = (out / "generations" / "step_000002.jsonl").read_text().splitlines()
    argv = ["eval", "--model", str(out / "final/adapter"), "--data", str(workdir / "eval.jsonl")]
    argv += ["--reward", "exact", "--answer-field", "response", "--limit", "6"]
    argv += ["--max-new-tokens", "6", "--output-dir", str(tmp_path / "eval"), "--device", "cpu"]
    assert main(argv) == 0
    after = (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x)["response"] for x in after] == [json.loads(x)["response"] for x in during]
