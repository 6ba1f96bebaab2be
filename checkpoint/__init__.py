"""Reshardable checkpoints: every rank writes the pieces it owns, any layout reads them back.

What is stored (all at global shape, experts on the global expert axis):
    model/<param>               the parameters (the model's dtype)
    buffer/<name>               the persistent buffers (the routers' expert bias): state that
                                is not a parameter; replicated, in their own dtype
    master/<param>              fp32 master weights, only where they differ in dtype (ZeRO bf16)
    optim/<param>/exp_avg       Adam's moments, fp32, out of DeepSpeed's flat partitions with
    optim/<param>/exp_avg_sq    their padding removed when ZeRO is on
and in the manifest: step, Adam's step count, tokens and samples seen (the data position of
every dp rank follows from it, see trainer/data.py), the layout it was saved with, the resolved
config, the format version; per-rank RNG states go in each rank's shard file. Every tensor of
a committed checkpoint is finite: save refuses one that is not.

Why our own format and not torch.distributed.checkpoint: ZeRO fragments are flat ranges of a
parameter, which DCP's rectangular chunks cannot express without first gathering them; and we
want a checksum per file, a commit marker we control, and a reader that needs no process group
(the inspect CLI). The files are plain `torch.save` dicts of tensors, read with weights_only.

One module per concept:
    layout.py     where each rank's piece of a tensor sits in the global tensor (Box, Shard),
                  FSDP's DTensor shards (zero_stage 3) included
    store.py      files on disk: shard files, manifest, commit marker, `latest`, retention
    reader.py     a committed checkpoint opened for reading: checks, checksums, any block
    save.py       the collective save: every rank writes its pieces, rank 0 commits
    load.py       the collective load under any layout (resharding), and weights-only loads
    optimizer.py  Adam's state of the plain optimizer (zero_stage 0 and 3) in and out
    zero.py       Adam's state and master weights in and out of DeepSpeed's ZeRO partitions
    compat.py     what must agree between a checkpoint and the run that loads it
    select.py     which checkpoint a run resumes or starts from (resume=auto across ranks)
    errors.py     CheckpointError, StorageError, and how every rank raises the same one
"""
