"""checkpoint.init_from=hf:PATH at one process, dp 4 x ep 4 and dp 2 x tp 2 x ep 2 equals
transformers on the same weights; export gives the files back bit for bit.

For each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and expert layout (save_pretrained's
per-expert keys in several shards with an index; transformers' fused tensors in one file),
each rank goes the way launcher.train goes (load_config, start_from_hf, validate,
build_model: each rank reads exactly the elements it holds) and then computes on dp rank d's batch: logits
and loss equal transformers' on that batch, and every gradient, reduced over the layout and
gathered to global shape, equals transformers' gradient of the dp-averaged loss. fp32
tolerance: the largest error within REL of the reference tensor's largest magnitude.

Each case also saves a checkpoint (step 0), which this process exports: every tensor equals
the file it came from bit for bit, and transformers loads the export with no missing or
unexpected key and computes the same logits bit for bit; a directory's tokenizer files go
along, unless they changed since the run started. The same at zero_stage 3 (filled before
FSDP shards), and in the deepspeed backend (logits only). A run trained 2 steps at dp 2 x tp 2
x ep 2 under ZeRO-2 exports to the same files as after resharding it to one process, and
greedy moe-generate on a checkpoint equals transformers' generate token for token.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoint.errors import CheckpointError
from checkpoint.hf.start import SUGGESTED
from tests.distributed.spawn import case_result, run_cases
from tests.tolerance import close
from tests.unit.hf_tiny import tiny_hf, write_dirs

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
EXPERT_LAYOUTS = ["per_expert", "fused"]
PARALLEL = {1: [(1, 1, 1)], 4: [(4, 1, 4), (2, 2, 2)]}  # world -> (dp, tp, ep)
REL = 2e-5
VOCAB = 96  # tests/unit/hf_tiny.py
ZERO2 = ("qwen2_moe", "per_expert")  # the trained run: shared expert, biases, a dense block
TOKENIZED = ("olmoe", "per_expert")  # a directory with tokenizer files, which export carries
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _write_tokenizer(folder):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / TOKENIZER_FILES[0]))
    (folder / TOKENIZER_FILES[1]).write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')


def _job(root, family, layout, dp, tp, ep, run, *extra):
    from launcher.config import load_config

    return load_config([f"--checkpoint.init_from=hf:{root}/{family}/{layout}", f"--parallel.dp={dp}",
                        f"--parallel.tp={tp}", f"--parallel.ep={ep}", "--train.seq_len=16",
                        "--train.micro_batch_size=2", "--train.steps=4", "--train.warmup_steps=1",
                        "--data.source=tokens", f"--data.path={root}/tokens.bin",
                        "--data.token_dtype=uint8", f"--logging.run_dir={root}/runs/{run}",
                        "--logging.tensorboard=false", "--logging.progress=false", *extra])


def _trainer(rank, world, job, start):
    """A Trainer built as launcher.train builds it (`start`: an HFStart, or None)."""
    from launcher.train import build_model
    from parallel.topology import Topology
    from trainer.data import load_corpus, rank_data
    from trainer.loop import Trainer

    layout = job.validate(world)
    topo = Topology.create(layout)
    model = build_model(job, topo, torch.device("cpu"), start)
    data = rank_data(load_corpus(job.data), job.train, job.model.vocab_size, layout.coords(rank)["dp"], layout.dp)
    trainer = Trainer(job, model, topo, torch.device("cpu"), data, local_rank=rank)
    trainer.model_source = start.hf.record() if start else None
    return trainer


class _Counting:
    """A TensorSource counting the elements its reads return."""

    def __init__(self, source):
        self.source, self.elements = source, 0

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def read(self, name, index):
        out = self.source.read(name, index)
        self.elements += out.numel()
        return out


_REFERENCES = {}


def _reference(root, family):
    """transformers' model of `family` from the per-expert directory, once per process."""
    import transformers as tf

    if family not in _REFERENCES:
        _REFERENCES[family] = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{family}/per_expert").eval()
    return _REFERENCES[family]


def _import(rank, world, root, family, layout, dp, tp, ep):
    from checkpoint.hf import FAMILIES as BY_TYPE
    from checkpoint.hf import ours_to_hf
    from checkpoint.hf.start import start_from_hf
    from parallel.data_parallel import reduce_gradients
    from parallel.expert_parallel import split_parameters
    from tests.distributed.gather import gather_global

    job = _job(root, family, layout, dp, tp, ep, f"{family}-{layout}-dp{dp}-tp{tp}-ep{ep}")
    start = start_from_hf(job)
    start.hf.source = counting = _Counting(start.hf.source)
    trainer = _trainer(rank, world, job, start)
    path = trainer.save()
    model, topo = trainer.model.eval(), trainer.topology
    # Each rank read exactly the elements it holds (tp splits whole heads, so the rotary
    # relabelling reads no row beyond them): under ep and tp, never the whole model.
    held = sum(p.numel() for p in model.parameters())
    assert counting.elements == held, (counting.elements, held)
    if world > 1:
        assert held < sum(np.prod(counting.shape(n)) for n in counting.names())

    ref = _reference(root, family)
    ref.zero_grad()
    tokens = torch.randint(0, VOCAB, (dp, 2, 17), generator=torch.Generator().manual_seed(1))
    x, y = tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()
    want = [ref(input_ids=x[r], labels=y[r], shift_labels=y[r], output_router_logits=True) for r in range(dp)]
    (sum(w.loss for w in want) / dp).backward()
    d = topo.coord("dp")
    got = model(x[d], y[d])
    close(got.logits, want[d].logits, REL, "logits")
    close(got.loss, want[d].loss, REL, "loss")
    got.loss.backward()
    reduce_gradients(*split_parameters(model), topo)
    grads = gather_global(model, topo, {n: p.grad for n, p in model.named_parameters()})
    grads = ours_to_hf(BY_TYPE[family], grads, job.model, job.moe, "fused")
    for name, p in ref.named_parameters():
        close(grads[name], p.grad, REL, f"gradient of {name}")
    return str(path)


def _train_zero2(rank, world, root):
    """2 steps from the HF directory at dp 2 x tp 2 x ep 2 under ZeRO-2, then a checkpoint."""
    from checkpoint.hf.start import start_from_hf
    from tests.distributed.ckpt_setup import step_losses

    job = _job(root, *ZERO2, 2, 2, 2, "zero2", "--parallel.zero_stage=2")
    trainer = _trainer(rank, world, job, start_from_hf(job))
    for _ in range(2):
        step_losses(trainer)
    return str(trainer.save())


def _import_zero3(rank, world, root):
    """The HF directory at dp 2 x tp 2 x ep 2 under zero_stage 3 (FSDP2), saved at step 0."""
    from checkpoint.hf.start import start_from_hf

    job = _job(root, *ZERO2, 2, 2, 2, "zero3", "--parallel.zero_stage=3")
    return str(_trainer(rank, world, job, start_from_hf(job)).save())


DEEPSPEED = ("--moe.backend=deepspeed", "--moe.drop_tokens=false", "--moe.use_rts=false",
             "--moe.aux_loss_form=per_layer")  # DeepSpeed's gate has its own loss, not the pooled one


def _import_deepspeed(rank, world, root):
    """Mixtral into the deepspeed backend at dp 4 x ep 2 (dropless): its logits equal
    transformers' (DeepSpeed's top-2 gate renormalises as Mixtral's router does; its
    load-balancing loss is its own, so the loss is not compared); saved at step 0."""
    from checkpoint.hf.start import start_from_hf

    job = _job(root, "mixtral", "per_expert", 4, 1, 2, "deepspeed", *DEEPSPEED)
    trainer = _trainer(rank, world, job, start_from_hf(job))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        close(trainer.model.eval()(tokens).logits, _reference(root, "mixtral")(tokens).logits, REL, "logits")
    return str(trainer.save())


def _reshard_to_one(rank, world, root, path):
    """The ZeRO-2 checkpoint loaded by one process (no ZeRO) and saved again."""
    from checkpoint.hf.start import start_from_hf
    from checkpoint.reader import open_checkpoint

    job = _job(root, *ZERO2, 1, 1, 1, "zero2-to-one")
    start_from_hf(job)  # the model's configs, from the directory the run started from
    job.checkpoint.init_from = None
    trainer = _trainer(rank, world, job, None)
    trainer.resume(open_checkpoint(path))
    return str(trainer.save())


def _case(rank, world, kind, *args):
    cases = {"import": _import, "zero2": _train_zero2, "zero3": _import_zero3,
             "deepspeed": _import_deepspeed, "reshard": _reshard_to_one}
    return cases[kind](rank, world, *args)


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_import")
    for family in FAMILIES:
        write_dirs(tiny_hf(family), root / family)
    _write_tokenizer(root / TOKENIZED[0] / TOKENIZED[1])
    tokens = np.random.default_rng(0).integers(0, VOCAB, 20_000, dtype=np.uint8)
    tokens.tofile(root / "tokens.bin")
    return root


@pytest.fixture(scope="module")
def results(hf_root):
    root = str(hf_root)
    cases = {w: [("import", root, f, lay, *p) for f in FAMILIES for lay in EXPERT_LAYOUTS for p in ps]
             for w, ps in PARALLEL.items()}
    out = run_cases(_case, 4, cases[4] + [("zero2", root), ("zero3", root), ("deepspeed", root)],
                    timeout_s=900)
    trained = case_result(out, ("zero2", root))[0]
    out |= run_cases(_case, 1, cases[1] + [("reshard", root, trained)], timeout_s=600)
    return out


IDS = [f"{f}-{lay}" for f in FAMILIES for lay in EXPERT_LAYOUTS]
PAIRS = [(f, lay) for f in FAMILIES for lay in EXPERT_LAYOUTS]


@pytest.mark.distributed
@pytest.mark.parametrize("family, layout", PAIRS, ids=IDS)
@pytest.mark.parametrize("dp, tp, ep", [p for ps in PARALLEL.values() for p in ps],
                         ids=[f"dp{a}-tp{b}-ep{c}" for ps in PARALLEL.values() for a, b, c in ps])
def test_import_equals_transformers(results, hf_root, family, layout, dp, tp, ep):
    case_result(results, ("import", str(hf_root), family, layout, dp, tp, ep))


def _files(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("family, layout", PAIRS, ids=IDS)
def test_import_then_export_is_bitwise_and_transformers_loads_it(results, hf_root, tmp_path, family, layout):
    import transformers as tf

    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    want = tf.AutoModelForCausalLM.from_pretrained(hf_root / family / layout).eval()(tokens).logits
    for dp, tp, ep in [p for ps in PARALLEL.values() for p in ps]:
        path = case_result(results, ("import", str(hf_root), family, layout, dp, tp, ep))[0]
        out = _export_equals_source(path, hf_root / family / layout, tmp_path / f"dp{dp}-tp{tp}-ep{ep}", layout)
        model, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert torch.equal(model.eval()(tokens).logits, want), out.name
        carried = [f.name for f in out.iterdir() if f.name in TOKENIZER_FILES]
        assert sorted(carried) == (sorted(TOKENIZER_FILES) if (family, layout) == TOKENIZED else [])
        for name in carried:
            assert (out / name).read_bytes() == (hf_root / family / layout / name).read_bytes()


def _export_equals_source(path, source, out, layout, training=True):
    """Export checkpoint `path` to `out` in 30 kB shards: every tensor equals the source
    directory's bit for bit, the index matches the files, config.json maps to the same configs
    (without `training`: but for the training settings the run set itself)."""
    from checkpoint.hf.export import export_checkpoint
    from checkpoint.hf.hf_dir import open_hf_dir
    from checkpoint.reader import open_checkpoint

    original = _files(source)
    export_checkpoint(open_checkpoint(path), out, layout=layout, max_shard_bytes=30_000, progress=False)
    exported = _files(out)
    assert exported.keys() == original.keys(), exported.keys() ^ original.keys()
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), (out.name, name)
    assert (out / "model.safetensors.index.json").is_file()  # 30 kB shards: several files
    assert set(open_hf_dir(out).source.names()) == original.keys()  # the index matches the files
    (model_a, moe_a), (model_b, moe_b) = open_hf_dir(out).configs(), open_hf_dir(source).configs()
    if not training:
        moe_a = dataclasses.replace(moe_a, **{n: getattr(moe_b, n) for n in SUGGESTED["moe"]})
    assert (model_a, moe_a) == (model_b, moe_b)
    return out


@pytest.mark.distributed
def test_import_into_the_deepspeed_backend_equals_transformers_and_exports_bitwise(results, hf_root, tmp_path):
    path = case_result(results, ("deepspeed", str(hf_root)))[0]
    _export_equals_source(path, hf_root / "mixtral" / "per_expert", tmp_path / "out", "per_expert",
                          training=False)


@pytest.mark.distributed
def test_import_at_zero_stage_3_then_export_is_bitwise(results, hf_root, tmp_path):
    """The directory filled before FSDP shards the parameters (dp 2 x tp 2 x ep 2, stage 3):
    its step-0 checkpoint exports to the same tensors."""
    from checkpoint.reader import open_checkpoint

    path = case_result(results, ("zero3", str(hf_root)))[0]
    assert open_checkpoint(path).meta["zero_stage"] == 3
    _export_equals_source(path, hf_root / ZERO2[0] / ZERO2[1], tmp_path / "out", ZERO2[1])


@pytest.mark.distributed
def test_zero2_export_equals_the_export_after_resharding_to_one_process(results, hf_root, tmp_path):
    from checkpoint.hf.export import export_checkpoint
    from checkpoint.reader import open_checkpoint

    trained = case_result(results, ("zero2", str(hf_root)))[0]
    resharded = case_result(results, ("reshard", str(hf_root), trained))[0]
    a, b = open_checkpoint(trained), open_checkpoint(resharded)
    assert (a.meta["layout"]["world_size"], a.meta["zero_stage"], b.meta["layout"]["world_size"]) == (4, 2, 1)
    export_checkpoint(a, tmp_path / "a", progress=False)
    export_checkpoint(b, tmp_path / "b", progress=False)
    x, y = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    original = _files(hf_root / ZERO2[0] / ZERO2[1])
    assert not torch.equal(x["model.norm.weight"], original["model.norm.weight"])  # it trained


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_moe_generate_on_a_checkpoint_equals_transformers_generate(results, hf_root, capsys, family):
    import transformers as tf

    from launcher.generate import main

    path = case_result(results, ("import", str(hf_root), family, "fused", 2, 2, 2))[0]
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    hf = tf.AutoModelForCausalLM.from_pretrained(hf_root / family / "per_expert").eval()
    want = hf.generate(prompt, max_new_tokens=32, do_sample=False)[0].tolist()
    capsys.readouterr()
    assert main([path, "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--max-new-tokens=32",
                 "--ids", "--device=cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got) == 40 and got == want


@pytest.mark.distributed
def test_export_refuses_a_tokenizer_changed_since_the_run_started(results, hf_root, tmp_path):
    """The checkpoint records the sha256 of the tokenizer.json it started with: a changed file
    is refused, not copied; another directory or none may be named instead."""
    from checkpoint.hf.export import export_checkpoint
    from checkpoint.reader import open_checkpoint

    ckpt = open_checkpoint(case_result(results, ("import", str(hf_root), *TOKENIZED, 1, 1, 1))[0])
    source = hf_root / TOKENIZED[0] / TOKENIZED[1] / TOKENIZER_FILES[0]
    assert ckpt.meta["model_source"]["tokenizer_files"] == list(TOKENIZER_FILES)
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n")
        with pytest.raises(CheckpointError, match=r"whose tokenizer files \(tokenizer.json, "
                                                  r"tokenizer_config.json\) are gone or changed since"):
            export_checkpoint(ckpt, tmp_path / "refused", progress=False)
        assert not (tmp_path / "refused").exists()
        export_checkpoint(ckpt, tmp_path / "none", with_tokenizer=False, progress=False)
        assert not any(f.name in TOKENIZER_FILES for f in (tmp_path / "none").iterdir())
        other = tmp_path / "other"
        other.mkdir()
        _write_tokenizer(other)
        export_checkpoint(ckpt, tmp_path / "named", tokenizer=other, progress=False)
        assert (tmp_path / "named" / TOKENIZER_FILES[0]).read_bytes() == (other / TOKENIZER_FILES[0]).read_bytes()
    finally:
        source.write_bytes(original)
