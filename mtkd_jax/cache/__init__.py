"""Teacher-output cache: run the teachers once, then distill from disk without them.

Teachers dominate the cost of online distillation (`benchmarks/run.py`; measurements in
`benchmarks/RESULTS.md`). When the teachers are frozen and the inputs of an epoch are known in
advance, their outputs can be computed once per example (and per augmented view) and read
back for every epoch: the distill step then costs about as much as training the student
alone (`make_distill_step(student_apply, None, tx)` reads `batch["teacher_logits"]`).

What is stored, per example-view (`build_cache`):

* **full logits** (`top_k=None`): the teachers' logits `[K, C]`, in `dtype` (float32
  round-trips exactly; float16 halves the size). Reconstruction is the identity.
* **top-k** (`top_k=k`): per teacher, the k largest log-probabilities at T = 1 (in `dtype`,
  default float16), their class indices and the log of the mass outside the top-k. Read
  back as full logits with one of `FILLS` (`DEFAULT_FILL` = ``"uniform"``): see
  `mtkd_jax.cache.topk`; or read as they are (`with_cached_top_k`) and distilled without
  expanding them (`mtkd_jax.objective.top_k_slots`).

Augmented training: a fixed number of views per example (`num_views`), each with its own
cached output; batches carry `"view"` next to `"index"`, and the view's input must be
reproducible from `(index, view)` (`augment_view` derives a per-example key from both).

Multi-host: each process builds its own shard (`shard="p0"`, ...) over the examples it sees
(`build_cache_in_parallel` does this and opens them together); `open_cache` reads every
shard in the directory, so a process can look up any example another process cached (a
shared file system is assumed).

Modules: `topk` (the top-k math and the fills), `format` (the on-disk layout), `writer`
(`build_cache`), `parallel_build` (`build_cache_in_parallel`), `reader` (`TeacherCache`,
`open_cache`, `with_cached_logits`, `with_cached_top_k`), `views` (`augment_view`).
"""

from mtkd_jax.cache.parallel_build import build_cache_in_parallel
from mtkd_jax.cache.reader import TeacherCache, open_cache, with_cached_logits, with_cached_top_k
from mtkd_jax.cache.topk import (
    DEFAULT_FILL,
    FILLS,
    TOP_K_FILL,
    TopK,
    expand_top_k,
    top_k_of_logits,
)
from mtkd_jax.cache.views import augment_view
from mtkd_jax.cache.writer import build_cache

__all__ = [
    "DEFAULT_FILL",
    "FILLS",
    "TOP_K_FILL",
    "TeacherCache",
    "TopK",
    "augment_view",
    "build_cache",
    "build_cache_in_parallel",
    "expand_top_k",
    "open_cache",
    "top_k_of_logits",
    "with_cached_logits",
    "with_cached_top_k",
]
