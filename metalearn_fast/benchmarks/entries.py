"""Entry names, the same in every group of every suite; the report divides by PLAIN_TORCH's median."""

OURS = "metalearn_fast"
OURS_AVX2 = "metalearn_fast, AVX2 kernels"  # on a CPU with AVX-512: the same, its per-task kernel forced to AVX2
FALLBACK = "metalearn_fast fallback"
PLAIN_TORCH = "plain torch"
TORCH_FUNC = "torch.func"
PER_TASK_LOOP = "per-task loop"
HIGHER = "higher"
LEARN2LEARN = "learn2learn"
# the order of the rows in each table of the report; other entries follow
ENTRY_ORDER = [OURS, OURS_AVX2, FALLBACK, PLAIN_TORCH, TORCH_FUNC, PER_TASK_LOOP, HIGHER, LEARN2LEARN]
