"""Config: YAML < CLI layering, types, unknown keys, and every validation message."""

import dataclasses
import typing

import pytest
import torch

from launcher.config import JobConfig, describe_schema, field_docs, load_config
from model.errors import ConfigError

TINY = "configs/cpu_tiny.yaml"


def test_yaml_then_cli_overrides_in_order():
    job = load_config(["--config", TINY, "--moe.top_k=1", "--train.lr", "1e-3", "--moe.top_k=3"])
    assert job.moe.top_k == 3 and job.train.lr == 1e-3
    assert job.parallel.ep == 4 and job.model.dim == 128  # from the YAML file
    assert job.validate(world_size=4).ep == 4


def test_cli_values_parse_by_declared_type():
    job = load_config(["--moe.renormalize=false", "--parallel.dp=null", "--train.grad_clip=2",
                       "--logging.run_dir=/tmp/x", "--checkpoint.init_from=none"])
    assert job.moe.renormalize is False and job.parallel.dp is None
    assert job.train.grad_clip == 2.0 and isinstance(job.train.grad_clip, float)
    assert job.logging.run_dir == "/tmp/x" and job.checkpoint.init_from is None


@pytest.mark.parametrize("args, message", [
    (["--moe.topk=2"], r"unknown config key 'moe.topk' \(did you mean 'moe.top_k'\?\)"),
    (["--modle.dim=2"], r"unknown config key 'modle.dim' \(did you mean 'model'\?\)"),
    (["--moe.top_k=two"], r"moe.top_k must be an integer, got 'two'"),
    (["--moe.renormalize=maybe"], r"moe.renormalize must be a boolean \(true/false\), got 'maybe'"),
    (["--train.steps=null"], r"train.steps must be an integer, got null"),
    (["stray"], r"unexpected argument 'stray'"),
    (["--config", "nope.yaml"], r"config file nope.yaml does not exist"),
    (["--train.lr=nan"], r"train.lr must be a finite number, got nan"),
    (["--parallel.timeout_s", "inf"], r"parallel.timeout_s must be a finite number, got inf"),
    (["--logging.run_dir", "--train.steps=5"], r"--logging.run_dir needs a value, not the flag --train.steps=5"),
    (["--config", "a.yaml", "--config", "b.yaml"], r"config file b.yaml does not exist"),  # the last wins
])
def test_bad_cli_input_is_named(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe:\n  num_expert: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'moe.num_expert' \(did you mean 'moe.num_experts'\?\)"):
        load_config(["--config", str(bad)])
    bad.write_text("train:\n  steps: 1.5\n")
    with pytest.raises(ConfigError, match=r"train.steps must be an integer, got 1.5 \(float\)"):
        load_config(["--config", str(bad)])
    bad.write_text("train:\n  lr: 3e-3\n")  # YAML 1.1 reads this as a string; we accept it
    assert load_config(["--config", str(bad)]).train.lr == 3e-3


@pytest.mark.parametrize("overrides, world, message", [
    (["--moe.num_experts=6", "--parallel.ep=4"], 4,
     r"moe.num_experts \(6\) must be divisible by parallel.ep \(4\)"),
    (["--moe.top_k=9"], 4, r"moe.top_k \(9\) must be between 1 and moe.num_experts \(8\)"),
    (["--moe.top_k=0"], 4, r"moe.top_k \(0\) must be between 1 and moe.num_experts \(8\)"),
    (["--parallel.dp=6", "--parallel.ep=4"], 6,
     r"parallel.ep \(4\) must divide parallel.dp \(6\)"),
    ([], 2, r"WORLD_SIZE \(2\) must equal parallel.dp \(4\) x tp \(1\)"),
    (["--data.source=text", "--data.path=/no/such/dir"], 4, r"data.path \(/no/such/dir\) does not exist"),
    (["--data.source=tokens"], 4, r"data.path is required when data.source is 'tokens'"),
    (["--model.n_heads=3"], 4, r"model.dim \(128\) must be divisible by model.n_heads \(3\)"),
    (["--train.seq_len=512"], 4, r"train.seq_len \(512\) must be <= model.max_seq_len \(128\)"),
    (["--moe.expert_hidden=100"], 4, r"moe.expert_hidden \(100\) to be multiples of 8"),
    (["--moe.backend=fast"], 4, r"moe.backend \('fast'\) must be one of: native, deepspeed, megablocks$"),
    (["--moe.capacity_factor=2"], 4,
     r"moe.capacity_factor \(2.0\) applies only to moe.backend deepspeed; the native backend is dropless"),
    (["--moe.backend=deepspeed", "--moe.top_k=2", "--moe.renormalize=false"], 4,
     r"moe.backend deepspeed with moe.top_k 2 always uses renormalize=True; leave moe.renormalize unset"),
    (["--moe.backend=deepspeed", "--moe.noisy_gate_policy=rsample"], 4,
     r"moe.noisy_gate_policy rsample needs moe.top_k 1, not 2"),
    (["--moe.backend=deepspeed", "--parallel.dp=2", "--parallel.tp=2", "--parallel.ep=2"], 4,
     r"moe.backend deepspeed runs with parallel.tp 1 only \(got 2\)"),
    (["--moe.backend=deepspeed", "--moe.expert_impl=loop"], 4,
     r"moe.expert_impl \('loop'\) does not apply to moe.backend deepspeed, which computes its "
     r"experts with batched matmuls over its capacity buffer"),
    (["--model.vocab_size=100"], 4, r"model.vocab_size \(100\) must be >= 256"),
    (["--parallel.dp=1", "--parallel.tp=4", "--parallel.ep=1", "--model.n_heads=2"], 4,
     r"model.n_heads \(2\) must be divisible by parallel.tp \(4\)"),
    (["--parallel.dp=1", "--parallel.tp=4", "--parallel.ep=1", "--model.ffn_hidden=390"], 4,
     r"model.ffn_hidden \(390\) must be divisible by parallel.tp \(4\)"),
    (["--parallel.dp=1", "--parallel.tp=4", "--parallel.ep=1", "--moe.shared_expert_hidden=90"], 4,
     r"moe.shared_expert_hidden \(90\) must be divisible by parallel.tp \(4\)"),
    (["--moe.shared_expert_hidden=-1"], 4,
     r"moe.shared_expert_hidden \(-1\) must be >= 0 \(0 = no shared expert\)"),
    (["--moe.bias_update_rate=-0.1"], 4, r"moe.bias_update_rate \(-0.1\) must be >= 0 \(0 = off\)"),
    (["--moe.backend=deepspeed", "--moe.bias_update_rate=0.001"], 4,
     r"moe.bias_update_rate \(0.001\) needs our router to choose the experts; in the deepspeed "
     r"backend DeepSpeed's gate chooses them"),
    (["--parallel.dp=null", "--parallel.tp=3", "--parallel.ep=1"], 4,
     r"WORLD_SIZE \(4\) must be divisible by parallel.tp \(3\)"),
    # Attention and routing of HF families (model.n_kv_heads ... moe.dense_layers).
    (["--model.n_kv_heads=3"], 4, r"model.n_heads \(4\) must be divisible by model.n_kv_heads \(3\)"),
    (["--parallel.dp=1", "--parallel.tp=4", "--parallel.ep=1", "--model.n_kv_heads=2"], 4,
     r"model.n_kv_heads \(2\) must be divisible by parallel.tp \(4\): tp splits the key/value "
     r"heads as it splits model.n_heads \(4\)"),
    (["--model.head_dim=15"], 4, r"the head size \(15: model.head_dim, or model.dim / model.n_heads\) must be even"),
    (["--model.qk_norm=layer"], 4, r"model.qk_norm \('layer'\) must be one of: none, head, proj$"),
    (["--moe.score_func=relu"], 4, r"moe.score_func \('relu'\) must be one of: softmax, sigmoid$"),
    (["--moe.aux_loss_form=global"], 4, r"moe.aux_loss_form \('global'\) must be one of: per_layer, pooled$"),
    (["--moe.shared_expert_gate=true"], 4, r"moe.shared_expert_gate true needs a shared expert"),
    (["--moe.routed_scaling_factor=0"], 4, r"moe.routed_scaling_factor \(0.0\) must be > 0"),
    (["--moe.n_group=3"], 4, r"moe.num_experts \(8\) must be divisible by moe.n_group \(3\) into groups of at least 2"),
    (["--moe.n_group=8"], 4, r"moe.num_experts \(8\) must be divisible by moe.n_group \(8\) into groups of at least 2"),
    (["--moe.n_group=4", "--moe.topk_group=5"], 4, r"moe.topk_group \(5\) must be between 1 and moe.n_group \(4\)"),
    (["--moe.n_group=4", "--moe.topk_group=1", "--moe.top_k=3"], 4,
     r"moe.top_k \(3\) exceeds the experts of moe.topk_group \(1\) groups of 2"),
    (["--moe.backend=deepspeed", "--moe.score_func=sigmoid", "--moe.expert_bias=true"], 4,
     r"moe.score_func \('sigmoid'\), moe.expert_bias \(True\) need our router to choose the experts"),
    (["--moe.backend=deepspeed", "--moe.aux_loss_form=pooled"], 4,
     r"moe.aux_loss_form \('pooled'\) needs our router to choose the experts"),
    (["--moe.first_k_dense=-1"], 4, r"moe.first_k_dense \(-1\) must be >= 0"),
    (["--moe.dense_layers=[0,0]"], 4, r"moe.dense_layers \(\[0, 0\]\) must list distinct block indices >= 0"),
    (["--moe.dense_layers=1,4"], 4, r"moe.dense_layers \(\[1, 4\]\) names blocks \[4\] beyond model.n_layers \(4\)"),
    (["--parallel.dp=2", "--parallel.tp=2", "--parallel.ep=2", "--train.micro_batch_size=1",
      "--train.seq_len=3", "--model.max_seq_len=3"], 4,
     r"train.micro_batch_size x train.seq_len \(3\), must be divisible by parallel.tp \(2\)"),
    (["--parallel.zero_stage=5"], 4, r"parallel.zero_stage \(5\) must be 0, 1, 2 or 3"),
    (["--parallel.zero_stage=2", "--parallel.fsdp_reduce_every_micro_batch=true"], 4,
     r"parallel.fsdp_reduce_every_micro_batch applies to parallel.zero_stage 3 \(FSDP\), not 2"),
    (["--train.precision=fp16"], 4, r"train.precision \('fp16'\) must be one of: auto, fp32, bf16$"),
    (["--train.recompute=attention"], 4, r"train.recompute \('attention'\) must be one of: none, ffn, full$"),
])
def test_validation_messages_name_the_values(overrides, world, message):
    job = load_config(["--config", TINY, *overrides])
    with pytest.raises(ConfigError, match=message):
        job.validate(world_size=world)


def test_lists_parse_from_the_cli_and_yaml(tmp_path):
    """moe.dense_layers, a list of integers: `[1, 3]`, `1,3` or `[]` on the command line."""
    for raw, want in (("[1, 3]", [1, 3]), ("1,3", [1, 3]), ("[]", []), ("null", None)):
        assert load_config([f"--moe.dense_layers={raw}"]).moe.dense_layers == want
    with pytest.raises(ConfigError, match=r"moe.dense_layers\[1\] must be an integer, got 'x'"):
        load_config(["--moe.dense_layers=1,x"])
    path = tmp_path / "c.yaml"
    path.write_text("moe:\n  dense_layers: [0, 2]\n")
    assert load_config(["--config", str(path)]).moe.dense_layers == [0, 2]
    for value, message in (("2", r"moe.dense_layers must be a list of integers, got 2 \(int\)"),
                           ("[0.5]", r"moe.dense_layers\[0\] must be an integer, got 0.5 \(float\)")):
        path.write_text(f"moe:\n  dense_layers: {value}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(["--config", str(path)])


def test_renormalized_top1_is_allowed():
    """Mixtral at top_k 1: every combine weight is 1; allowed, and the docstring says what
    the router then learns from."""
    job = load_config(["--config", TINY, "--moe.top_k=1", "--moe.renormalize=true"])
    job.validate(world_size=4)
    assert job.moe.renormalizes


def test_dp_is_derived_from_world_size_when_null():
    job = load_config(["--config", TINY, "--parallel.dp=null", "--parallel.ep=2"])
    layout = job.validate(world_size=8)
    assert (layout.dp, layout.ep, layout.edp) == (8, 2, 4)


def test_every_field_has_a_docstring_and_help_lists_it():
    text = describe_schema()
    for section in dataclasses.fields(JobConfig):
        cls = section.default_factory
        docs = field_docs(cls)
        for name in typing.get_type_hints(cls):
            assert docs.get(name), f"{section.name}.{name} has no docstring"
            assert f"--{section.name}.{name} " in text


def test_resolved_config_round_trips_through_yaml(tmp_path):
    job = load_config(["--config", TINY, "--moe.top_k=1"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(job.to_yaml())
    assert load_config(["--config", str(saved)]) == job


def test_grouped_mm_alignment_binds_the_native_backend_only():
    """The deepspeed backend's batched matmuls take any expert_hidden (so do megablocks')."""
    job = load_config(["--config", "configs/cpu_tiny.yaml", "--moe.backend=deepspeed",
                       "--moe.expert_hidden=100"])
    assert job.validate(world_size=4).ep == 4


def test_precision_auto_is_bf16_on_cuda_only():
    from trainer.optim import compute_dtype

    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert compute_dtype("fp32", torch.device("cuda", 0)) == torch.float32
