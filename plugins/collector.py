"""What the kernel hands to whoever measures its task vectors during a merge.

A merge puts one collector in its `MergeContext` (finmerge.plugins.merge_context), so statistics
come from the tensors the merge already holds, with no second read of the inputs. A collector
implements `start_tensor(name, shape) -> accumulator` and `finish_tensor(accumulator)`; per chunk
the kernel calls `accumulator.update(base, tau_d, tau_i, scratch=buffer)` with 1-D chunks in the
compute dtype and a same-size buffer the accumulator may overwrite (so measuring allocates
nothing). `finish_tensor` must be thread safe, because mergekit's --multi-gpu runs kernels in worker
threads; an accumulator belongs to one kernel call, so it needs no lock. A collector serves one
merge: mergekit-multi runs several in one process, each with a fresh one.
finmerge.diagnostics.StatsCollector is the implementation.
"""

# Entries per chunk of the domain_instruct kernel: fp32 scratch stays 4 × 4 MiB however large the
# tensor, and chunks that fit in the CPU cache make its passes ~2× faster than 16M-entry chunks.
# `finmerge diagnose` chunks the same way, so its sums round exactly like the in-merge ones.
CHUNK_ELEMENTS = 1024 * 1024
